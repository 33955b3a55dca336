"""hw3lib.kernel: the workbook's kernel spec, for this environment and (when asked) for the user."""
import json
import os
import subprocess
import sys
from pathlib import Path

from hw3lib import kernel


def _install(tmp_path, *extra):
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "user")}
    subprocess.run([sys.executable, "-m", "hw3lib.kernel", "--install", *extra], env=env, check=True,
                   capture_output=True, text=True)
    return tmp_path / "user/kernels/hw3/kernel.json"


def test_install_writes_no_user_level_spec_unless_asked(tmp_path):
    """A user-level spec is one for every clone: each set-up would point all of them at its own Python."""
    assert not _install(tmp_path).exists()
    assert (Path(sys.prefix) / "share/jupyter/kernels/hw3/kernel.json").is_file()
    user = _install(tmp_path, "--user")
    assert json.loads(user.read_text())["argv"][0] == sys.executable


def test_lab_puts_this_environments_kernels_first(monkeypatch):
    """Jupyter reads a user-level "hw3" (another clone's) before the environment's: hw3 lab puts the environment's
    folder first on JUPYTER_PATH, which comes before both."""
    seen = {}
    monkeypatch.setenv("JUPYTER_PATH", "/elsewhere")
    monkeypatch.setattr(kernel.os, "execv", lambda exe, argv: seen.update(argv=argv))
    kernel.lab(port=None, open_browser=False, extra=[])
    first, *rest = os.environ["JUPYTER_PATH"].split(os.pathsep)
    assert first == str(Path(sys.prefix) / "share" / "jupyter") and rest == ["/elsewhere"]
    assert "--no-browser" in seen["argv"]
    assert "--ContentsManager.pre_save_hook=hw3lib.kernel.clean_on_save" in seen["argv"]  # autosave stays clean
