"""The Python PTB tokenizer must agree with pycocoevalcap's Java one on tricky captions."""
import json
from pathlib import Path

import pytest

from hw3lib.metrics import java_available
from hw3lib.ptb import ptb_tokenize

CORPUS = [line.rstrip("\n") for line in (Path(__file__).parent / "ptb_corpus.txt").open(encoding="utf-8")]


def _both(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {i: [{"caption": c}] for i, c in enumerate(captions)}
    return PTBTokenizer().tokenize(data), ptb_tokenize(data)


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_agrees_with_java_on_tricky_captions():
    java, python = _both(CORPUS)
    diff = [(CORPUS[i], java[i][0], python[i][0]) for i in java if java[i] != python[i]]
    assert not diff, diff


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_agrees_with_java_on_the_world(world):
    caps = [a["caption"] for a in json.loads((world / "p2_data/val.json").read_text())["annotations"]][:500]
    java, python = _both(caps)
    assert java == python


def test_known_tokens():
    out = ptb_tokenize({0: [{"caption": "A man's dog (big) isn't here."}]})
    assert out == {0: ["a man 's dog -lrb- big -rrb- is n't here"]}


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_java_runner_equals_pycocoevalcap_and_leaves_nothing_behind(tmp_path):
    """hw3lib's runner of the Java tokenizer gives pycocoevalcap's output exactly, with several captions per key
    and newlines inside captions, and writes nothing into pycocoevalcap's package folder."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from hw3lib.metrics import java_ptb_tokenize

    folder = Path(ptbtokenizer.__file__).parent
    before = set(folder.iterdir())
    data = {f"k{i}": [{"caption": c}, {"caption": c.upper() + " \n"}] for i, c in enumerate(CORPUS[:40])}
    assert java_ptb_tokenize(data) == PTBTokenizer().tokenize(data)
    java_ptb_tokenize(data)
    assert set(folder.iterdir()) == before


@pytest.mark.parametrize("tokenizer", ["java", "python"])
def test_a_line_break_in_a_caption_shifts_no_other_caption(tokenizer):
    """Java's PTB tokenizer (-preserveLines) ends a line at \\r, \\v, \\f, U+2028 and U+2029 as at \\n: one such
    caption would become two lines and pair every later caption with its neighbour's tokens. Each becomes a space,
    with Java as with the port, and the scores equal those of the caption with a space."""
    if tokenizer == "java" and not java_available():
        pytest.skip("needs java (pycocoevalcap's PTB tokenizer)")
    from hw3lib.cider import cider, java_ptb_tokenize
    from hw3lib.ptb import ptb_tokenize

    tokenize = java_ptb_tokenize if tokenizer == "java" else ptb_tokenize
    for brk in ["\n", "\r", "\r\n", "\v", "\f", "\u2028", "\u2029"]:
        data = {"1": [{"caption": f"a red{brk}circle"}], "2": [{"caption": "a blue square"}]}
        assert tokenize(data) == {"1": ["a red circle"], "2": ["a blue square"]}, repr(brk)
    refs = {"1": ["a red circle", "a red ring"], "2": ["a blue square", "one blue box"],
            "3": ["a green star", "a star"]}
    plain = {"1": "a red circle", "2": "a blue square", "3": "a green star"}
    broken = {**plain, "1": "a red\rcircle"}
    if tokenizer == "java":
        assert cider(broken, refs) == cider(plain, refs)
