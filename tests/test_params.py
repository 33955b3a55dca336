"""hw3lib.params: a notebook's annotated parameters cell, papermill's injected values, and the checks."""
import json
import subprocess
import sys

import pytest

from hw3lib.params import check, read

# IPython's shell replaces sys.modules["__main__"] for good: run it in a process of its own
CELLS = """
import json
from IPython.core.interactiveshell import InteractiveShell
sh = InteractiveShell.instance()
sh.run_cell('data_root: str = "data"  # a folder\\nepochs: int = 5\\nlr: float = 0.003\\nwarm: bool = True\\n')
sh.run_cell('epochs = 7\\nlr = 1\\nlayer = 3')  # papermill's injected cell: plain assignments
sh.run_cell('from hw3lib.params import read\\nP = vars(read(globals()))')
sh.run_cell('epochs = "five"')
bad = sh.run_cell('read(globals())').error_in_exec
print(json.dumps({"P": sh.user_ns["P"], "error": f"{type(bad).__name__}: {bad}"}))
"""


def test_read_takes_the_annotations_of_the_parameters_cell():
    out = json.loads(subprocess.run([sys.executable, "-c", CELLS], capture_output=True, text=True, check=True
                                    ).stdout.strip().splitlines()[-1])
    assert out["P"] == {"data_root": "data", "epochs": 7, "lr": 1.0, "warm": True}  # only the declared names
    assert out["error"].startswith("TypeError: parameter 'epochs' must be int")


@pytest.mark.parametrize("kind, value, expected", [
    (int, 3, 3), (float, 2, 2.0), (str, 3, "3"), (bool, False, False), (dict, {"a": 1}, {"a": 1}),
])
def test_check_accepts(kind, value, expected):
    assert check("x", kind, value) == expected


@pytest.mark.parametrize("kind, value", [(int, True), (int, 2.5), (bool, 1), (str, 2.5), (dict, [1])])
def test_check_rejects(kind, value):
    with pytest.raises(TypeError, match="parameter 'x'"):
        check("x", kind, value)


def test_nothing_declared():
    with pytest.raises(NameError, match="annotates each one"):
        read({"x": 1})


@pytest.mark.parametrize("name, kind, value, message", [
    ("num_show", int, -5, "'num_show' must be at least 1, got -5"), ("num_show", int, 0, "at least 1, got 0"),
    ("llava_num_workers", int, -1, "at least 0"), ("lr", float, 0, "'lr' must be above 0"),
    ("lr", float, float("nan"), "above 0"),
])
def test_check_bounds(name, kind, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check(name, kind, value)


def test_every_default_and_config_value_within_bounds():
    """The bounds hold for what the notebooks declare and what the committed configs set."""
    import papermill

    from hw3lib.workbook import ROOT, WorkbookConfig, _check_types

    declared = {nb.stem: papermill.inspect_notebook(str(nb)) for nb in sorted((ROOT / "notebooks").glob("0*.ipynb"))}
    defaults = {n: eval(i["default"]) for d in declared.values() for n, i in d.items()  # noqa: S307 (own notebooks)
                if i["inferred_type_name"] in ("int", "float")}
    _check_types(defaults, declared)
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        _check_types(dict(WorkbookConfig.load(config).parameters), declared)
