"""Run the workbook: every notebook in order with papermill, HTML reports with nbconvert, one metrics.json.

A config (``configs/demo.yaml``) names the profile, the output folder, the notebooks and a flat block of
parameters. Each notebook receives the parameters that its ``parameters`` cell declares; a parameter that no
notebook declares is an error (a typo would otherwise be silently ignored).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DataError, atomic_path, check_output_dir
from .report import CUDA_PEAK_ENV, merge_metrics

ROOT = Path(__file__).resolve().parents[1]


class WorkbookError(RuntimeError):
    """A notebook failed or the config is wrong; the message names the notebook and the cell."""


class ConfigError(WorkbookError):
    """The config (or a command-line override) is wrong: found before any notebook runs."""


@dataclass
class WorkbookConfig:
    profile: str  # "demo" or "hw3": names outputs/<profile>/
    output_dir: Path  # where executed notebooks, report/ and metrics.json go
    notebooks: list[str]  # notebook names (without .ipynb) in the order they run
    parameters: dict = field(default_factory=dict)  # flat: name -> value, passed to the notebooks that declare it
    demo_world: bool = False  # build the shapes world and check the stand-ins before running

    @classmethod
    def load(cls, path: str | Path) -> "WorkbookConfig":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        allowed = {"profile", "output_dir", "notebooks", "parameters", "demo_world"}
        if not isinstance(raw, dict) or set(raw) - allowed or "profile" not in raw:
            raise ConfigError(f"{path}: a config is a mapping with 'profile' and any of {sorted(allowed)}; "
                                f"got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        params = raw.get("parameters") or {}
        bad = {k: type(v).__name__ for k, v in params.items() if not isinstance(v, (str, int, float, bool, type(None)))}
        if bad:
            raise ConfigError(f"{path}: parameters must be flat primitives (str, int, float, bool, null); {bad}")
        notebooks = raw.get("notebooks")
        if not isinstance(notebooks, list) or not notebooks or not all(isinstance(n, str) for n in notebooks):
            raise ConfigError(f"{path}: 'notebooks' must be a non-empty list of notebook names, got {notebooks!r}")
        return cls(profile=raw["profile"], output_dir=Path(raw.get("output_dir", f"outputs/{raw['profile']}")),
                   notebooks=list(raw.get("notebooks") or []), parameters=params,
                   demo_world=bool(raw.get("demo_world", False)))

    def override(self, pairs: list) -> None:
        """``-p NAME VALUE`` pairs, typed as papermill's ``-p`` types them: int, float, True/False/None, else text."""
        for name, value in pairs:
            self.parameters[name] = _papermill_value(value)


def _papermill_value(value: str):
    special = {"True": True, "true": True, "False": False, "false": False, "None": None, "null": None}
    if value in special:
        return special[value]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def notebook_path(name: str) -> Path:
    return ROOT / "notebooks" / f"{name}.ipynb"


def _declared(nb: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(nb))


def run(config: WorkbookConfig, only: list[str] | None = None, html: bool = True, log=print,
        progress: bool = True) -> dict:
    """Execute the config's notebooks (or ``only`` these) and return the merged metrics. ``progress``: papermill's
    bar (cell n of N, elapsed) while each notebook runs."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    unknown_only = sorted(set(only or ()) - set(config.notebooks))
    if unknown_only:
        raise ConfigError(f"--only {unknown_only}: not among the config's notebooks {config.notebooks}")
    names = [n for n in config.notebooks if not only or n in only]
    missing = [n for n in names if not notebook_path(n).is_file()]
    if missing:
        raise ConfigError(f"notebooks not found: {[str(notebook_path(n)) for n in missing]}")
    declared = {n: _declared(notebook_path(n)) for n in names}
    unknown = sorted(set(config.parameters) - {p for d in declared.values() for p in d})
    if unknown and not only:
        raise ConfigError(f"parameters {unknown} are declared by none of the notebooks {names}")
    if config.demo_world:
        from .demo import ensure_demo_data

        ensure_demo_data(log=log)
    out = ROOT / config.output_dir if not config.output_dir.is_absolute() else config.output_dir
    try:
        check_output_dir(out, "output_dir")
    except DataError as e:
        raise ConfigError(str(e)) from None
    # kernels inherit the environment: an MPLBACKEND such as Agg would keep every figure out of the notebooks
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    (out / "report").mkdir(parents=True, exist_ok=True)
    device, costs = _device_name(), {}
    for name in names:
        params = {k: v for k, v in config.parameters.items() if k in declared[name]}
        if "output_dir" in declared[name]:
            params["output_dir"] = str(out)
        target = out / f"{name}.ipynb"
        log(f"[{config.profile}] running {name} ...")
        t0 = time.time()
        peak_file = out / "metrics" / f".cuda_peak_{name}.json"
        peak_file.unlink(missing_ok=True)
        os.environ[CUDA_PEAK_ENV] = str(peak_file)  # the kernel inherits it; report.save_metrics writes there
        try:
            with PeakMemory() as peak:
                papermill.execute_notebook(str(notebook_path(name)), str(target), parameters=params,
                                           cwd=str(ROOT), kernel_name="python3", progress_bar=progress,
                                           log_output=False, kernel_manager_class=_local_kernel_manager())
        except PapermillExecutionError as e:
            first_line = next((line for line in (e.source or "").splitlines() if line.strip()), "")
            raise WorkbookError(f"{name}.ipynb failed in cell [{e.exec_count}] ({first_line[:60]!r}): {e.ename}: "
                                f"{e.evalue}; the executed notebook with the traceback is {target}") from None
        cost = {"seconds": round(time.time() - t0, 1), **peak.as_dict(), "device": device}
        if peak_file.is_file():  # PyTorch's own peaks inside the kernel
            torch_peak = json.loads(peak_file.read_text())
            cost.update(torch_allocated_gib=torch_peak["allocated_gib"], torch_reserved_gib=torch_peak["reserved_gib"])
            peak_file.unlink()
        costs = _record_cost(out, name, cost)
        if html:
            _export_html(target, out / "report" / f"{name}.html")
        gpu = f", peak GPU {cost['peak_gpu_gib']} GiB" if cost["peak_gpu_gib"] is not None else ""
        log(f"[{config.profile}] {name} done in {cost['seconds']:.0f}s{gpu}, peak RAM {cost['peak_rss_gib']} GiB")
    timings = {n: c["seconds"] for n, c in costs.items()} if names else {}
    merged = merge_metrics(out, {"profile": config.profile, "notebook_seconds": timings})
    log(f"[{config.profile}] metrics: {out / 'metrics.json'}; reports: {out / 'report'}")
    return merged


def _local_kernel_manager():
    """Kernels talk to the runner over Unix sockets, not TCP on localhost: nothing listens on a port, and ipykernel
    has no reason to warn that its TCP traffic is unencrypted."""
    from jupyter_client.manager import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"

    return LocalKernelManager


class PeakMemory:
    """Peak memory of one notebook's run, sampled every ``interval`` seconds in a thread while it executes.

    * ``peak_gpu_gib``: the GPUs' used memory (``nvidia-smi``, all cards summed) above what was in use when the
      notebook started: the kernel's tensors, its allocator's cache and its CUDA context. PyTorch's allocator keeps
      freed blocks while the card has room, so on a large card this is an upper bound; the runner also records
      ``torch_allocated_gib`` (what the tensors needed at most) from the kernel. None where there is no
      ``nvidia-smi``.
    * ``peak_rss_gib``: resident memory of the runner's child processes (the kernel and its DataLoader workers).
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_gpu, self.peak_rss = interval, None, 0
        self._stop = threading.Event()
        self._smi = shutil.which("nvidia-smi")
        self._base = self._gpu_used() if self._smi else None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gpu_used(self) -> int | None:
        try:
            out = subprocess.run([self._smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return sum(int(x) for x in out.split()) * 2**20  # MiB -> bytes
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _rss(self) -> int:
        import psutil

        total = 0
        for child in psutil.Process().children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            if self._base is not None:
                used = self._gpu_used()
                if used is not None:
                    self.peak_gpu = max(self.peak_gpu or 0, used - self._base)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict:
        gib = 2**30
        return {"peak_gpu_gib": None if self.peak_gpu is None else round(self.peak_gpu / gib, 2),
                "peak_rss_gib": round(self.peak_rss / gib, 2)}


def _record_cost(out: Path, name: str, cost: dict) -> dict:
    """Add one notebook's cost to ``metrics/notebook_cost.json`` (runs with ``--only`` add to earlier ones)."""
    from .report import save_metrics

    path = out / "metrics" / "notebook_cost.json"
    costs = json.loads(path.read_text()) if path.is_file() else {}
    costs[name] = cost
    save_metrics(out, "notebook_cost", costs)
    return costs


def _device_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            names = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10).stdout.split("\n")
            names = [n.strip() for n in names if n.strip()]
            if names:
                return f"{len(names)} x {names[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return f"CPU ({os.cpu_count()} cores)"


def _export_html(notebook: Path, html: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    with atomic_path(html) as tmp:
        tmp.write_text(body, encoding="utf-8")

