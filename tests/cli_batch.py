"""Run many ``hw3`` command lines in one process, each as ``python -m hw3lib ARGS`` would run it, and write what each
printed and its exit status to a JSON file. ``tests/test_bad_inputs.py`` uses it: one interpreter imports torch and
transformers once for its share of the corpus, instead of once a case.

    python tests/cli_batch.py CASES.json RESULTS.json      # CASES.json: [[name, [arg, ...]], ...]

Each case sees a fresh start where it matters for what a user sees: file descriptors 1 and 2 are captured (so a
child process's output is caught too), warnings are shown again (not once per process), and the environment and the
working folder are put back afterwards.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hw3lib, as `python -m hw3lib` there
CASE_SECONDS = 600  # a case that runs longer: its stacks, then this process ends (the test names the case)
STDERR = os.fdopen(os.dup(2), "w")  # this process's own stderr, while each case's fd 2 goes to its capture


def _fresh_process_flags() -> None:
    """What a new interpreter would start with: the warnings that the package and transformers say once per
    process, and the features kept in memory between training runs."""
    from hw3lib import cider, train
    from hw3lib.llava import decoding

    cider._warned_no_java, decoding._capture_failed = False, False
    train._FEATURES.clear()
    if "transformers" in sys.modules:
        from transformers.utils.logging import warning_once

        warning_once.cache_clear()


def run_one(argv: list[str]) -> dict:
    from hw3lib.cli import main

    _fresh_process_flags()
    env, cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        faulthandler.dump_traceback_later(CASE_SECONDS, exit=True, file=STDERR)
        try:
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's errors, and anything that exits
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 -- what the interpreter would print, and its status
                traceback.print_exc()
                code = 1
            sys.stdout.flush(), sys.stderr.flush()
        finally:
            faulthandler.cancel_dump_traceback_later()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            os.environ.clear(), os.environ.update(env), os.chdir(cwd)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return {"returncode": code, "stdout": texts[0], "stderr": texts[1]}


if __name__ == "__main__":
    cases_file, results_file = sys.argv[1:3]
    with open(results_file, "w") as f:  # one JSON line per case as it ends: a crash or a hang leaves the ones before
        for name, argv in json.loads(open(cases_file).read()):
            print(f"case {name}", file=STDERR, flush=True)  # the last one named is the one that did not end
            f.write(json.dumps({"name": name, **run_one(argv)}) + "\n")
            f.flush()
