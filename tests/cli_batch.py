"""Run many ``hw3`` command lines in one process, each as ``python -m hw3lib ARGS`` would run it, and write what each
printed and its exit status to a JSON file. ``tests/test_bad_inputs.py`` uses it: one interpreter imports torch and
transformers once for its share of the corpus, instead of once a case.

    python tests/cli_batch.py CASES.json RESULTS.json      # CASES.json: [[name, [arg, ...]], ...]

Each case sees a fresh start where it matters for what a user sees: file descriptors 1 and 2 are captured (so a
child process's output is caught too), warnings are shown again (not once per process), and the environment and the
working folder are put back afterwards.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
import warnings


def run_one(argv: list[str]) -> dict:
    from hw3lib.cli import main

    env, cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
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
    results = {name: run_one(argv) for name, argv in json.loads(open(cases_file).read())}
    with open(results_file, "w") as f:
        json.dump(results, f)
