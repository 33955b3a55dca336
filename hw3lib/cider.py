"""CIDEr-D exactly as the course's ``evaluate.py`` computes it: pycocoevalcap's scorer after the PTB tokenizer (Java,
shipped inside pycocoevalcap; without Java, :mod:`hw3lib.ptb` reproduces it in Python and says so once).

This module imports no torch, so that :func:`cider_in_background` can run it in a process of its own while CLIP
encodes the images (``python -m hw3lib.cider`` reads ``{"predictions", "references"}`` JSON on stdin).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from .data import DataError, check_keys
from .ptb import _next_words, one_line, ptb_tokenize

NO_JAVA = ("java not found: CIDEr uses hw3lib.ptb, a Python port of the PTB tokenizer (install a JRE, e.g. "
           "`apt install default-jre` or conda's openjdk, to use pycocoevalcap's own)")
_warned_no_java = False


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize(captions_for_image: dict) -> dict:
    """PTB-tokenise ``{key: [{"caption": str}, ...]}`` with Java when present, else the Python port (said once)."""
    global _warned_no_java
    if java_available():
        return java_ptb_tokenize(captions_for_image)
    if not _warned_no_java:
        warnings.warn(NO_JAVA, stacklevel=2)
        _warned_no_java = True
    return ptb_tokenize(captions_for_image)


def java_ptb_tokenize(captions_for_image: dict) -> dict:
    """pycocoevalcap's ``PTBTokenizer.tokenize``, step for step (the same jar, flags, input and punctuation filter),
    except where the temporary file lives: a temporary folder instead of pycocoevalcap's package folder (which may
    be read-only, and kept the file when the job was killed), and Java's "PTBTokenizer tokenized ..." lines on
    stderr are kept out of the output."""
    import subprocess
    import tempfile

    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).resolve().parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    keys = [k for k, v in captions_for_image.items() for _ in range(len(v))]
    # pycocoevalcap replaces only "\n": a "\r" (or \v, \f, U+2028, U+2029) would end a line too (one_line)
    sentences = "\n".join(one_line(c["caption"]) for v in captions_for_image.values() for c in v)
    with tempfile.TemporaryDirectory(prefix="hw3-ptb-") as tmp:
        (Path(tmp) / "captions.txt").write_bytes(sentences.encode())
        done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", "captions.txt"], cwd=tmp, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer (Java, {jar.name}) failed: {done.stderr.decode()[-300:]}")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    out: dict = {}
    for k, line in zip(keys, done.stdout.decode().split("\n")):
        out.setdefault(k, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in punctuation))
    return out


def cider(predictions: dict[str, str], references: dict[str, list[str]], workers: int = 1,
          ) -> tuple[float, dict[str, float]]:
    """CIDEr-D of ``predictions`` against ``references`` (keys must match). Returns (corpus score, per-image).

    ``workers`` > 1 forks that many processes (use it only in a process without threads or CUDA, as
    :func:`cider_in_background`'s): they PTB-tokenise (the Python port; Java is one call) and score the images in
    slices, with the document frequencies of the whole set. The arithmetic is pycocoevalcap's either way, so the
    numbers are the same to the last bit (tests/test_metrics.py)."""
    check_keys(predictions, references)
    keys = list(references)
    if workers > 1 and len(keys) >= 2 * workers:
        return _cider_forked(predictions, references, keys, workers)
    res = tokenize({k: [{"caption": predictions[k]}] for k in keys})
    gts = tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
    score, scores = Cider().compute_score(gts, res)
    return float(score), {k: float(s) for k, s in zip(keys, scores)}


_shared: dict = {}  # what forked workers read: set before the pool forks, so never pickled


def _tokenize_slice(bounds: tuple[int, int]) -> tuple[dict, dict]:
    every, predictions, references = _shared["keys"], _shared["predictions"], _shared["references"]
    keys, later = every[slice(*bounds)], every[bounds[1]:]  # whether "b." ends a sentence: the next words
    return (ptb_tokenize({k: [{"caption": predictions[k]}] for k in keys},
                         _next_words([one_line(predictions[k]) for k in _to_a_word(later, predictions)], 0)),
            ptb_tokenize({k: [{"caption": c} for c in references[k]] for k in keys},
                         _next_words([one_line(c) for k in _to_a_word(later, references) for c in references[k]], 0)))


def _to_a_word(keys: list, captions: dict) -> list:
    """The first of ``keys`` up to the first whose caption(s) hold a word (what Java reads on to)."""
    for n, k in enumerate(keys):
        if any(c.strip() for c in ([captions[k]] if isinstance(captions[k], str) else captions[k])):
            return keys[:n + 1]
    return keys


def _score_slice(bounds: tuple[int, int]) -> list[float]:
    """pycocoevalcap's per-image CIDEr-D of images ``a .. b``. CiderScorer scores every entry it holds and takes
    log(number of entries) as the corpus size, so it gets all N entries, those outside the slice empty (they cost
    microseconds, and their NaN scores are dropped), and the whole set's document frequencies."""
    import numpy as np

    whole, (a, b) = _shared["scorer"], bounds
    part = CiderScorer(n=whole.n, sigma=whole.sigma)
    n = len(whole.crefs)
    part.crefs = [[]] * a + whole.crefs[a:b] + [[]] * (n - b)
    part.ctest = [{}] * a + whole.ctest[a:b] + [{}] * (n - b)
    part.document_frequency = whole.document_frequency
    with np.errstate(divide="ignore", invalid="ignore"):
        return part.compute_cider()[a:b]


def _cider_forked(predictions, references, keys, workers) -> tuple[float, dict[str, float]]:
    import multiprocessing

    import numpy as np

    context = multiprocessing.get_context("fork")
    edges = np.linspace(0, len(keys), workers + 1).astype(int)
    slices = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    _shared.update(keys=keys, predictions=predictions, references=references)
    try:
        if java_available():  # one JVM for all: starting one per slice costs more than it saves
            res = tokenize({k: [{"caption": predictions[k]}] for k in keys})
            gts = tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
        else:
            tokenize({})  # says once that the Python port is used
            res, gts = {}, {}
            with context.Pool(workers) as pool:
                for r, g in pool.map(_tokenize_slice, slices):
                    res.update(r)
                    gts.update(g)
        whole = CiderScorer(n=4, sigma=6.0)  # Cider().compute_score's scorer, filled the same way
        for k in keys:
            whole += (res[k][0], gts[k])
        whole.compute_doc_freq()
        _shared["scorer"] = whole
        with context.Pool(workers) as pool:
            scores = [s for part in pool.map(_score_slice, slices) for s in part]
    finally:
        _shared.clear()
    return float(np.mean(np.array(scores))), {k: float(s) for k, s in zip(keys, scores)}


def cider_in_background(predictions: dict[str, str], references: dict[str, list[str]],
                        workers: int | None = None) -> Future:
    """:func:`cider` in a separate Python process (pure Python and a Java tokenizer: a thread would hold the GIL
    against the caller's work), which forks ``workers`` (default: half the cores, at most 8) for the large sets.
    ``.result()`` gives what :func:`cider` returns, or raises its error."""
    global _warned_no_java
    check_keys(predictions, references)
    if not java_available() and not _warned_no_java:
        warnings.warn(NO_JAVA, stacklevel=2)
        _warned_no_java = True
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 1) // 2))
    proc = subprocess.Popen([sys.executable, "-m", "hw3lib.cider", str(workers)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    payload = json.dumps({"predictions": predictions, "references": references})

    def wait() -> tuple[float, dict[str, float]]:
        out, err = proc.communicate(payload)
        if proc.returncode != 0:
            raise DataError(f"CIDEr failed: {(err.strip().splitlines() or ['?'])[-1]}")
        result = json.loads(out)
        return result["score"], result["per_image"]

    pool = ThreadPoolExecutor(1)
    future = pool.submit(wait)
    pool.shutdown(wait=False)
    return future


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # the parent said it
    job = json.load(sys.stdin)
    score, per_image = cider(job["predictions"], job["references"], workers=int(sys.argv[1]) if sys.argv[1:] else 1)
    json.dump({"score": score, "per_image": per_image}, sys.stdout)
