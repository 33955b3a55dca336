"""The workbook's Jupyter kernel, ``hw3`` ("HW3 workbook"), and the command that opens the workbook in JupyterLab.

The kernel is this environment's Python, started in the workbook's root folder: the notebooks' default paths
(``data/demo/hw3_data``, ``outputs/demo``) are relative to it, exactly as under ``hw3 run``, whichever folder a
front end starts kernels in. The notebooks' kernelspec names it, so JupyterLab picks it without asking.

  python -m hw3lib.kernel --install      register it (the set-up does: for this environment and this user)
  python -m hw3lib.kernel -f CONN.json   what a front end runs (the kernelspec's argv)

With ``HW3_KERNEL_STACKS=FILE`` in its environment (``hw3 run`` sets it), the kernel writes every thread's Python
stacks to FILE when it crashes (a fatal signal) and whenever it receives SIGUSR1: where a hung or dead kernel was.
"""
from __future__ import annotations

import faulthandler
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from .data import ROOT

NAME = "hw3"
STACKS_ENV = "HW3_KERNEL_STACKS"
DISPLAY_NAME = "HW3 workbook"


def spec() -> dict:
    return {"argv": [sys.executable, "-m", "hw3lib.kernel", "-f", "{connection_file}"],
            "display_name": DISPLAY_NAME, "language": "python", "metadata": {"debugger": True}}


def install(user: bool) -> Path:
    """Register the kernel for this environment (``sys.prefix``) or for this user (what a JupyterLab installed
    elsewhere sees). Returns the kernelspec's folder."""
    from ipykernel.kernelspec import RESOURCES
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / NAME
        folder.mkdir()
        for logo in Path(RESOURCES).glob("logo-*.png"):  # the Python logos in the launcher
            shutil.copy(logo, folder)
        (folder / "kernel.json").write_text(json.dumps(spec(), indent=1))
        where = KernelSpecManager().install_kernel_spec(str(folder), NAME, user=user,
                                                        prefix=None if user else sys.prefix)
    return Path(where)


def installed() -> Path | None:
    """The folder of the ``hw3`` kernelspec that Jupyter would use, if it starts this Python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        found = KernelSpecManager().get_kernel_spec(NAME)
    except NoSuchKernel:
        return None
    return Path(found.resource_dir) if found.argv[:1] == [sys.executable] else None


def clean_on_save(model: dict, path: str, **_) -> None:
    """JupyterLab's pre-save hook under ``hw3 lab``: the workbook's own notebooks (``notebooks/NN_name.ipynb``) are
    saved as they are committed, without outputs, execution counts or widget state, so that autosave never dirties
    the repository. The outputs stay on screen; ``hw3 run`` writes executed copies to ``outputs/``. Other notebooks
    (your own, copies) are saved as they are."""
    if model.get("type") != "notebook" or not re.fullmatch(r"notebooks/\d\d_[^/]+\.ipynb", path.lstrip("/")):
        return
    nb = model["content"]
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)


def lab(port: int | None, open_browser: bool, extra: list[str]) -> None:
    """Replace this process with JupyterLab on 127.0.0.1 (token login), rooted at the workbook, notebooks open."""
    if installed() is None:
        install(user=False)
    # this environment's kernel spec before a user-level "hw3" (which another clone's set-up may have written)
    mine = str(Path(sys.prefix) / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([mine] + [p for p in os.environ.get("JUPYTER_PATH", "").split(
        os.pathsep) if p and p != mine])
    argv = [sys.executable, "-m", "jupyter", "lab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={ROOT}",
            "--LabApp.default_url=/lab/tree/notebooks", "--ContentsManager.pre_save_hook=hw3lib.kernel.clean_on_save"]
    argv += [f"--ServerApp.port={port}"] if port else []
    argv += [] if open_browser else ["--no-browser"]
    argv += ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # containers run as root
    os.execv(sys.executable, argv + extra)


def _quiet_progress_bars() -> None:
    """No progress bars in a notebook that ``hw3 run`` executes: in its HTML report each is a stale "0%" line, the
    text stand-in of a widget (``hw3 run`` shows papermill's own bar, cell by cell). A notebook opened in JupyterLab
    keeps them. ``tqdm.auto``'s notebook bar ignores ``TQDM_DISABLE``, so the class itself is replaced."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub and transformers
    import tqdm.auto

    class Quiet(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    tqdm.auto.tqdm = Quiet


def main(argv: list[str]) -> None:
    if argv[:1] == ["--install"]:
        # for this environment only, unless asked: a user-level spec is one for all clones, and the last set-up
        # would point every clone's JupyterLab at its own Python
        for user in (False, True) if "--user" in argv[1:] else (False,):
            try:
                print(f"kernel {NAME!r} ({DISPLAY_NAME}) -> {install(user)}")
            except OSError as e:  # a read-only home: the environment's own JupyterLab still sees the first one
                print(f"kernel {NAME!r}: not registered for this user ({e})", file=sys.stderr)
        return
    if argv[:1] == ["--here"]:  # hw3 run: papermill has chosen the folder
        argv = argv[1:]
        _quiet_progress_bars()
    else:
        os.chdir(ROOT)
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(argv)
    stacks = os.environ.pop(STACKS_ENV, "")  # not inherited by what the notebook starts
    if stacks:  # after initialize: ipykernel wraps faulthandler's functions there
        handle = open(stacks, "w", buffering=1)  # noqa: SIM115 -- open for the kernel's whole life
        faulthandler.enable(file=handle, all_threads=True)
        if hasattr(signal, "SIGUSR1"):
            faulthandler.register(signal.SIGUSR1, file=handle, all_threads=True)
    from .distributed import GPU_CAP_ENV, apply_gpu_cap

    if os.environ.get(GPU_CAP_ENV):  # hw3 run --gpu-cap: the card the run pretends to have
        apply_gpu_cap()
    app.start()


if __name__ == "__main__":
    main(sys.argv[1:])
