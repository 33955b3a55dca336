"""Every notebook's code exercise: the committed stub reports "not written yet", a wrong answer is caught, and the
solution shown in the notebook (its collapsed <details> block) passes the check."""
from __future__ import annotations

import re

import nbformat
import numpy as np
import pytest

import hw3lib.workbook as wb
from hw3lib.exercises import CHECKS, check, is_correct

NOTEBOOKS = sorted((wb.ROOT / "notebooks").glob("0*.ipynb"))


def exercises(path):
    """``[(name, function name, stub source, solution source)]`` of a notebook, in order."""
    cells, found = nbformat.read(str(path), as_version=4).cells, []
    for i, cell in enumerate(cells):
        solution = re.search(r"<summary>Solution</summary>.*?```python\n(.*?)```", cell.source, re.S)
        if cell.cell_type != "markdown" or not solution:
            continue
        stub = cells[i + 1].source
        name, fn = re.search(r'check\("(\w+)", (\w+)', stub).groups()
        found.append((name, fn, stub, solution.group(1)))
    return found


@pytest.fixture(scope="module")
def contexts(world):
    """What the exercises that need the run's data get from their notebook, built here from the demo world."""
    from collections import Counter

    from hw3lib.cider import cider
    from hw3lib.data import hw3_split

    references = {r.file_id: list(r.references) for r in hw3_split(world, "p2_data")}
    common = Counter(c for r in hw3_split(world, "p2_data", "train") for c in r.references).most_common(1)[0][0]
    model, _, rows, namespace = _attempt(world)
    return {"beat_the_baseline": {"references": references,
                                  "baseline": cider({k: common for k in references}, references)[0]},
            "attempt_parameters": {"rows": rows}}, {"attempt_parameters": namespace}


def _attempt(world):
    """Notebook 02's main model and attempt 1 (demo config, untrained: the counts do not depend on training), and
    the names the notebook's solution reads."""
    from types import SimpleNamespace

    from hw3lib.captioner import CaptionerConfig, EncoderConfig, build, checked_trainable_count, course_files
    from hw3lib.decoder import LoraConfig
    from hw3lib.demo import MODELS_DIR
    from hw3lib.train import attempt_configs

    cfg = CaptionerConfig(encoder=EncoderConfig(name=str(MODELS_DIR / "vit"), pool=2),
                          lora=LoraConfig(r=16, alpha=32, targets=("c_attn", "c_fc")), **course_files(world))
    model, encoder, _ = build(cfg)
    attempt, _, _ = build(attempt_configs(cfg, 4, ("c_attn",))["attempt 1"][1], with_encoder=False,
                          encoder_dim=encoder.num_features)
    rows = [{"run": "attempt 1", "trainable params": checked_trainable_count(attempt)}]
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    namespace = {"P": SimpleNamespace(attempt_lora_r=4), "n_layer": model.decoder.cfg.n_layer,
                 "C": model.decoder.cfg.n_embd, "cfg": cfg, "n_trainable": checked_trainable_count(model), "lora": lora}
    return model, attempt, rows, namespace


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_has_a_code_exercise_whose_solution_passes(path, contexts, capsys):
    contexts, namespaces = contexts
    found = exercises(path)
    assert found, f"{path.name}: no code exercise with a solution"
    for name, fn, stub, solution in found:
        assert name in CHECKS
        context = contexts.get(name, {})
        stub_ns = {"np": np}
        exec(stub[: stub.index("check(")], stub_ns)  # the stub as committed
        assert not is_correct(name, stub_ns[fn], **context)
        assert "correct" not in capsys.readouterr().out
        ns = {"np": np, **namespaces.get(name, {})}  # what the notebook has defined by then
        exec(solution, ns)
        assert is_correct(name, ns[fn], **context), f"{path.name}: the solution of {name} fails its check"
        assert capsys.readouterr().out.strip() == f"{name}: correct"
    assert check("clipscore", lambda cos: 2.5 * np.maximum(cos, 0)) is None  # a check cell shows no value


def test_a_wrong_answer_is_caught_with_a_reason(capsys):
    assert not is_correct("clipscore", lambda cos: 2.5 * cos)  # forgot the clip at 0
    assert "expected" in capsys.readouterr().out
    assert not is_correct("merge_lora", lambda W, A, B, alpha, r: W + B @ A)  # no scaling
    assert "alpha / r" in capsys.readouterr().out
    assert not is_correct("top_and_last", lambda p: (max(p, key=lambda k: p[k]["cider"]), min(p)))
    assert not is_correct("word_maps", lambda tokens, maps: ([t.strip() for t in tokens], maps))
    assert not is_correct("image_positions", lambda ids, image_id: (0, len(ids)))
    assert not is_correct("auc", lambda own, other: float((own[:, None] > other[None, :]).mean()))  # ties ignored
    assert "ties count half" in capsys.readouterr().out
    right_padded = lambda seqs, pad: (np.array([q + [pad] * (3 - len(q)) for q in seqs]),  # noqa: E731
                                      np.array([[1] * len(q) + [0] * (3 - len(q)) for q in seqs]))
    assert not is_correct("left_pad", right_padded)
    assert not is_correct("clipscore", lambda cos: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out.splitlines()[-1]
