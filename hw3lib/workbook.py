"""Run the workbook: every notebook in order with papermill, HTML reports with nbconvert, one metrics.json.

A config (``configs/demo.yaml``) names the profile, the output folder, the notebooks and a flat block of
parameters. Each notebook receives the parameters that its ``parameters`` cell declares; a parameter that no
notebook declares is an error (a typo would otherwise be silently ignored).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import ROOT, DataError, atomic_path, check_output_dir, relative
from .report import CUDA_PEAK_ENV, merge_metrics



class WorkbookError(RuntimeError):
    """A notebook failed or the config is wrong; the message names the notebook and the cell."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message says which notebook stopped and how to go on."""


class ConfigError(WorkbookError):
    """The config (or a command-line override) is wrong: found before any notebook runs."""


@dataclass
class WorkbookConfig:
    profile: str  # "demo" or "hw3": names outputs/<profile>/
    output_dir: Path  # where executed notebooks, report/ and metrics.json go
    notebooks: list[str]  # notebook names (without .ipynb) in the order they run
    parameters: dict = field(default_factory=dict)  # flat: name -> value, passed to the notebooks that declare it
    demo_world: bool = False  # build the shapes world and check the stand-ins before running
    cell_timeout: float | None = 1800  # seconds one cell may run before its kernel is stopped (None: no bound)
    notebooks_dir: Path | None = None  # where the notebooks are (None: the workbook's notebooks/)
    overridden: set = field(default_factory=set)  # the names given with -p

    @staticmethod
    def _read(path: Path, seen: tuple = ()) -> dict:
        """The config's mapping; one that ``extends: OTHER.yaml`` (relative to it) takes OTHER's keys and replaces
        those it names, its ``parameters`` one by one (``configs/hw3-24gb.yaml`` extends ``hw3.yaml``)."""
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        if not isinstance(raw, dict) or "extends" not in raw:
            return raw
        base = path.parent / str(raw.pop("extends"))
        if base.resolve() in seen:
            raise ConfigError(f"{path}: 'extends' goes round in a circle through {base}")
        parent = WorkbookConfig._read(base, seen + (path.resolve(),))
        if not isinstance(parent, dict):
            raise ConfigError(f"{base} (extended by {path}): a config is a mapping, got {type(parent).__name__}")
        params = raw.get("parameters")
        merged = {**parent, **raw}
        if isinstance(params, dict) and isinstance(parent.get("parameters"), dict):
            merged["parameters"] = {**parent["parameters"], **params}
        return merged

    @classmethod
    def load(cls, path: str | Path) -> "WorkbookConfig":
        path = Path(path)
        raw = cls._read(path)
        allowed = {"profile", "output_dir", "notebooks", "parameters", "demo_world", "cell_timeout", "notebooks_dir"}
        if not isinstance(raw, dict) or set(raw) - allowed or "profile" not in raw:
            raise ConfigError(f"{path}: a config is a mapping with 'profile' and any of "
                              f"{sorted(allowed | {'extends'})}; "
                              f"got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        if not isinstance(raw["profile"], str) or not raw["profile"].strip():
            raise ConfigError(f"{path}: 'profile' must be a name (demo, hw3, ...), got {raw['profile']!r}")
        if "output_dir" in raw and (not isinstance(raw["output_dir"], str) or not raw["output_dir"].strip()):
            raise ConfigError(f"{path}: 'output_dir' must be a folder path, got {raw['output_dir']!r}")
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: 'parameters' must be a mapping of name: value, got {type(params).__name__}")
        bad = {k: type(v).__name__ for k, v in params.items() if not isinstance(v, (str, int, float, bool, type(None)))}
        if bad:
            raise ConfigError(f"{path}: parameters must be flat primitives (str, int, float, bool, null); {bad}")
        notebooks = raw.get("notebooks")
        if not isinstance(notebooks, list) or not notebooks or not all(isinstance(n, str) for n in notebooks):
            raise ConfigError(f"{path}: 'notebooks' must be a non-empty list of notebook names, got {notebooks!r}")
        timeout = raw.get("cell_timeout", cls.cell_timeout)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise ConfigError(f"{path}: cell_timeout must be a number of seconds > 0 (or null: no bound), "
                              f"got {timeout!r}")
        return cls(profile=raw["profile"], output_dir=Path(raw.get("output_dir", f"outputs/{raw['profile']}")),
                   notebooks=list(raw.get("notebooks") or []), parameters=params,
                   demo_world=bool(raw.get("demo_world", False)), cell_timeout=timeout,
                   notebooks_dir=path.parent / raw["notebooks_dir"] if raw.get("notebooks_dir") else None)

    def override(self, pairs: list) -> None:
        """``-p NAME VALUE`` pairs, typed as papermill's ``-p`` types them: int, float, True/False/None, else text."""
        for name, value in pairs:
            if name == "output_dir":
                raise ConfigError("-p output_dir: the output folder is the config's output_dir (copy the config, "
                                  "or give -f one that extends it with another output_dir)")
            self.parameters[name] = _papermill_value(value)
            self.overridden.add(name)


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


def _kernel_failure(name: str, source: Path, target: Path, watchdog: "CellWatchdog", stacks: Path,
                    bound: float | None) -> str:
    """One line for a notebook whose kernel hung or died: the notebook, the cell, where the kernel was."""
    import nbformat

    index = watchdog.timed_out if watchdog.timed_out is not None else watchdog.last_cell
    cell = ""
    if index is not None:
        with contextlib.suppress(Exception):  # the executed copy has the injected parameters cell; the source not
            cells = nbformat.read(str(target if target.is_file() else source), as_version=4).cells
            first = next((line for line in cells[index].source.splitlines() if line.strip()), "")
            cell = f" in cell {index + 1} of {len(cells)} ({first[:60]!r})"
    where = where_it_was(stacks)
    where = f"; it was at {where} (all stacks: {stacks})" if where else ""
    if watchdog.timed_out is not None:
        return (f"{name}.ipynb: a cell ran past the {bound:g} s bound (cell_timeout) and its kernel was stopped"
                f"{cell}{where}; the executed notebook is {target}")
    process = watchdog.process
    status = process.poll() if process is not None else None
    how = ""
    if status is not None and status < 0:
        sig = signal.Signals(-status).name if -status in signal.valid_signals() else str(-status)
        how = f" (killed by {sig}{': out of host memory?' if sig == 'SIGKILL' else ''})"
    elif status is not None:
        how = f" (exit status {status})"
    log = kernel_log(stacks)
    said = f"; its own output: {log}" if log.is_file() and log.stat().st_size else ""
    return f"{name}.ipynb: its kernel died{how}{cell}{where}{said}; the executed notebook is {target}"


def notebook_path(name: str, folder: Path | None = None) -> Path:
    """``name``.ipynb in ``folder`` (a config's ``notebooks_dir``, relative to the config) or the workbook's."""
    return (folder or ROOT / "notebooks") / f"{name}.ipynb"


def _check_types(parameters: dict, declared: dict[str, dict]) -> None:
    """Each value against the type its notebooks declare (``name: int = 3``), as :func:`hw3lib.params.check` will
    inside the notebook, but for every notebook of the run before the first starts. A dict or a list given as text
    (``-p llava_instructions '{"a": "Describe it."}'``) is read as YAML (JSON is YAML) and replaced by its value."""
    import yaml

    from .params import check

    kinds = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}
    for nb, params in declared.items():
        for name, info in params.items():
            kind = kinds.get(info.get("inferred_type_name"))
            if name not in parameters or kind is None or name == "output_dir":
                continue
            value = parameters[name]
            if kind in (dict, list) and isinstance(value, str):
                try:
                    value = parameters[name] = yaml.safe_load(value)
                except yaml.YAMLError as e:
                    raise ConfigError(f"parameter {name!r} ({nb}): {kind.__name__} expected, and the text is not "
                                      f"YAML/JSON ({str(e).splitlines()[0]})") from None
            try:
                parameters[name] = check(name, kind, value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{e} (declared by {nb})") from None
            if name.endswith("lora_targets"):  # a misspelt layer would train without LoRA there
                from .decoder import LoraConfig

                try:
                    LoraConfig(targets=LoraConfig.parse_targets(parameters[name]))
                except ValueError as e:
                    raise ConfigError(f"parameter {name!r}: {e}") from None


def _declared(nb: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(nb))


def run(config: WorkbookConfig, only: list[str] | None = None, html: bool = True, log=print,
        progress: bool = True) -> dict:
    """Execute the config's notebooks (or ``only`` these) and return the merged metrics. ``progress``: papermill's
    bar (cell n of N, elapsed) while each notebook runs."""
    unknown_only = sorted(set(only or ()) - set(config.notebooks))
    if unknown_only:
        raise ConfigError(f"--only {unknown_only}: not among the config's notebooks {config.notebooks}")
    names = [n for n in config.notebooks if not only or n in only]
    source = {n: notebook_path(n, config.notebooks_dir) for n in names}
    missing = [str(path) for path in source.values() if not path.is_file()]
    if missing:
        raise ConfigError(f"notebooks not found: {missing}")
    every = {n: notebook_path(n, config.notebooks_dir) for n in config.notebooks}  # --only: the others' too
    declared_all = {n: _declared(path) for n, path in every.items() if path.is_file()}
    declared = {n: declared_all[n] for n in names}
    known = {p for d in (declared_all if only else declared).values() for p in d}
    unknown = sorted((config.overridden if only else set(config.parameters)) - known)
    if unknown:
        raise ConfigError(f"parameters {unknown} are declared by none of the notebooks "
                          f"{sorted(declared_all) if only else names}")
    _check_types(config.parameters, declared)  # every notebook's, before the first one starts
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
        if "output_dir" in declared[name]:  # relative to the workbook (the kernel's folder): no home folder in reports
            params["output_dir"] = relative(out, ROOT)
        target = out / f"{name}.ipynb"
        log(f"[{config.profile}] running {name} ...")
        t0 = time.time()
        peak_file = out / "metrics" / f".cuda_peak_{name}.json"
        peak_file.unlink(missing_ok=True)
        os.environ[CUDA_PEAK_ENV] = str(peak_file)  # the kernel inherits it; report.save_metrics writes there
        try:
            with PeakMemory() as peak:
                execute_in_child(name, source[name], target, params, ROOT, config.cell_timeout, progress)
        except KeyboardInterrupt:
            rest = names[names.index(name):]
            raise Interrupted(f"{name} stopped; its executed cells are in {target.with_suffix('.interrupted.ipynb')}"
                              f"; to go on: hw3 run -f CONFIG --only {' '.join(dict.fromkeys(rest))}") from None
        cost = {"seconds": round(time.time() - t0, 1), **peak.as_dict(), "device": device}
        if peak_file.is_file():  # PyTorch's own peaks inside the kernel
            torch_peak = json.loads(peak_file.read_text())
            cost.update(torch_allocated_gib=torch_peak["allocated_gib"], torch_reserved_gib=torch_peak["reserved_gib"])
            peak_file.unlink()
        costs = _record_cost(out, name, cost)
        if html:
            _export_html(target, out / "report" / f"{name}.html")
        gpu = f", peak GPU {cost['peak_gpu_gib']} GiB" if cost["peak_gpu_gib"] is not None else ""
        if "torch_allocated_gib" in cost:
            gpu += f" ({cost['torch_allocated_gib']} allocated by PyTorch)"
        log(f"[{config.profile}] {name} done in {cost['seconds']:.0f}s{gpu}, peak RAM {cost['peak_pss_gib']} GiB "
            f"(PSS; {cost['peak_pss_anon_gib']} anonymous)")
    timings = {n: c["seconds"] for n, c in costs.items()} if names else {}
    merged = merge_metrics(out, {"profile": config.profile, "notebook_seconds": timings})
    log(f"[{config.profile}] metrics: {out / 'metrics.json'}; reports: {out / 'report'}")
    if html:  # the report to hand in, from every notebook that has run so far (a missing one says so)
        from .handin import ReportError, write_report

        try:
            write_report(out, log=lambda line: log(f"[{config.profile}] {line}"))
        except ReportError as e:  # the notebooks' results stand; the report can be written again (hw3 report)
            log(f"[{config.profile}] report: {e}; once fixed: hw3 report -f CONFIG")
    return merged


def execute_in_child(name: str, source: Path, target: Path, params: dict, cwd: Path, cell_timeout: float | None,
                     progress: bool = True) -> None:
    """:func:`execute` in a child process of its own (``python -m hw3lib.workbook SPEC.json``), so that every
    notebook's kernel is the first and only one its runner starts. Run one after another in one process, a later
    kernel's cell could wait for ever for a reply that the kernel had sent: at the course's sizes, notebook 04 after
    03 hung at its widget cell, the kernel idle and the runner waiting (docs/rehearsal.md); a notebook run alone,
    in a process of its own, never did. The child's one-line error comes back as this process's WorkbookError."""
    spec = {"name": name, "source": str(source), "target": str(target), "params": params, "cwd": str(cwd),
            "cell_timeout": cell_timeout, "progress": progress}
    with tempfile.TemporaryDirectory(prefix="hw3-run-") as tmp:
        spec_file, result = Path(tmp) / "spec.json", Path(tmp) / "error.txt"
        spec_file.write_text(json.dumps({**spec, "error_file": str(result)}))
        child = subprocess.Popen([sys.executable, "-m", "hw3lib.workbook", str(spec_file)], cwd=str(cwd))
        try:
            status = child.wait()  # bounded: the child bounds every cell (cell_timeout) and the kernel's start
        except BaseException:  # Ctrl-C: the child stops its kernel (papermill's clean-up); what is left is killed
            _stop_child(child)
            if target.is_file():  # a notebook run part of the way is not left under the name of a finished one
                target.replace(target.with_suffix(".interrupted.ipynb"))
            raise
        if status != 0:
            message = result.read_text().strip() if result.is_file() else ""
            raise WorkbookError(message or f"{name}.ipynb: its runner process ended with status {status}")


def _stop_child(child: subprocess.Popen, grace: float = 10.0) -> None:
    """Ask ``child`` to stop as Ctrl-C does (SIGINT: papermill shuts its kernel down), wait ``grace`` seconds, then
    kill it and whatever of its process tree is left (the kernel, DataLoader workers)."""
    family = _family(child.pid)  # taken now: once the child has gone, its orphans are no longer its descendants
    if child.poll() is None:
        with contextlib.suppress(OSError):
            child.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace)
    _kill_all(family)
    child.wait()


def _family(pid: int) -> list:
    """The process ``pid`` and all its descendants (psutil processes, the descendants first); [] if it is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.children(recursive=True) + [process]
    except psutil.Error:
        return []


def _kill_all(processes: list) -> None:
    """SIGKILL each of ``processes``; one that has already ended is skipped (psutil checks that a pid was not
    reused)."""
    import psutil

    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()


def execute(name: str, source: Path, target: Path, params: dict, cwd: Path, cell_timeout: float | None,
            progress: bool = True) -> None:
    """Execute one notebook with papermill into ``target``, every cell bounded by ``cell_timeout`` seconds
    (:class:`CellWatchdog`). A failing cell, a hung cell and a dead kernel each raise a :class:`WorkbookError`
    whose one line names the notebook and the cell; the kernel's stacks are kept beside ``target`` for the last two.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    # nbclient logs "Kernel died while waiting for execute reply." through papermill's logger: the one line below
    # says it with the notebook and the cell
    logging.getLogger("papermill").setLevel(logging.CRITICAL)
    stacks = target.with_suffix(".stacks.txt")  # the kernel's Python stacks, kept only when it hung or died
    stacks.unlink(missing_ok=True)
    kernel_log(stacks).unlink(missing_ok=True)  # and its own output, kept only when the notebook failed
    manager = _local_kernel_manager(stacks)
    watchdog = CellWatchdog(cell_timeout, lambda: manager.started[-1].process if manager.started else None, stacks)
    # papermill records both paths in the executed notebook: relative to the workbook, no one's home folder in it
    here = Path.cwd().resolve() == Path(cwd).resolve()
    src, dst = (relative(p, cwd) if here else str(p) for p in (source, target))
    try:
        with watchdog:
            papermill.execute_notebook(src, dst, parameters=params, cwd=str(cwd),
                                       kernel_name="python3", progress_bar=progress, log_output=False,
                                       kernel_manager_class=manager,
                                       # nbclient's own bound, a backstop behind the watchdog's
                                       execution_timeout=cell_timeout + 60 if cell_timeout else None,
                                       **watchdog.hooks())
    except PapermillExecutionError as e:
        first_line = next((line for line in (e.source or "").splitlines() if line.strip()), "")
        evalue = e.evalue
        if e.ename == "OutOfMemoryError":  # torch's four sentences about its allocator, then what to lower
            evalue = f"{oom_head(e.evalue, os.environ.get('HW3_GPU_CAP_GIB'))}; {_OOM_ADVICE.get(name, '')}"
        raise WorkbookError(f"{name}.ipynb failed in cell [{e.exec_count}] ({first_line[:60]!r}): {e.ename}: "
                            f"{evalue}; the executed notebook with the traceback is {target}") from None
    except (CellTimeoutError, DeadKernelError):  # a hung cell (stopped by the watchdog or nbclient), a dead kernel
        raise WorkbookError(_kernel_failure(name, source, target, watchdog, stacks, cell_timeout)) from None
    stacks.unlink(missing_ok=True)
    kernel_log(stacks).unlink(missing_ok=True)


def oom_head(message: str, cap: str | None = None) -> str:
    """torch's four sentences about its allocator as one clause: what was asked for, and what PyTorch held then, in
    use and cached but free (much cached and free: the memory is fragmented, not full)."""
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", message or "")
    held = re.search(r"([\d.]+ \w+) is allocated by PyTorch,"
                     r"(?: with ([\d.]+ \w+) allocated in private pools(?: \([^)]*\))?,)?"  # (e.g., CUDA Graphs)
                     r" and ([\d.]+ \w+) is reserved by PyTorch but unallocated", message or "")
    head = "out of GPU memory" + (f" (PyTorch capped at {cap} GiB)" if cap else "")
    head += f": tried to allocate {asked.group(1)}" if asked else ""
    if not held:
        return head
    pools = f" ({held.group(2)} of it in CUDA graphs' pools)" if held.group(2) else ""
    return head + f" with {held.group(1)} in use{pools} and {held.group(3)} cached but free"


_OOM_ADVICE = {  # what to lower in each notebook, on a card too small for its config
    "01_llava_prompts": "lower llava_batch_size (-p llava_batch_size 4) and llava_greedy_batch_size where it is set, "
                        "or take the config for a smaller card (configs/hw3-24gb.yaml, configs/hw3-12gb.yaml: LLaVA "
                        "in 4-bit)",
    "02_train_lora_captioner": "in training, run it again with fewer captions per step (--only "
                               "02_train_lora_captioner -p batch_size 32) or pool the visual tokens (-p pool 2); in "
                               "the val scores, with fewer images per call (-p score_batch_size 16)",
    "03_evaluate": "run it again with fewer images per call (--only 03_evaluate -p batch_size 16)",
    "04_attention_maps": "load LLaVA in 4-bit (-p llava_load_in_4bit true; configs/hw3-12gb.yaml)",
}


def _child_main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    try:
        execute(spec["name"], Path(spec["source"]), Path(spec["target"]), spec["params"], Path(spec["cwd"]),
                spec["cell_timeout"], spec["progress"])
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 -- one line for the parent to show
        text = str(e) if isinstance(e, WorkbookError) else f"{spec['name']}.ipynb: {type(e).__name__}: {e}"
        log = kernel_log(Path(spec["target"]).with_suffix(".stacks.txt"))
        if not isinstance(e, WorkbookError) and log.is_file() and log.stat().st_size:  # e.g. a kernel that never
            text += f"; the kernel's own output: {log}"  # started: why it did not is in its log
        Path(spec["error_file"]).write_text(" ".join(text.split()))
        return 1
    return 0


def kernel_log(stacks: Path) -> Path:
    """Where a notebook's kernel writes its own output (``NB.kernel.log`` beside ``NB.stacks.txt``)."""
    return stacks.with_name(stacks.name.removesuffix(".stacks.txt") + ".kernel.log")


def _local_kernel_manager(stacks: Path):
    """The runner's kernel: this Python running :mod:`hw3lib.kernel`, which writes its stacks to ``stacks`` when it
    crashes or receives SIGUSR1 (:class:`CellWatchdog`).

    It talks to the runner over Unix sockets, not TCP on localhost: nothing listens on a port, and ipykernel has no
    reason to warn that its TCP traffic is unencrypted. Each kernel's sockets live in a folder of their own, removed
    with it: jupyter_client's default names them ``kernel-ipc-1`` ... ``kernel-ipc-5`` in the working folder, the
    same names for every kernel of a run."""
    from jupyter_client.manager import AsyncKernelManager

    from . import kernel
    from .kernel import STACKS_ENV

    class LocalKernelManager(AsyncKernelManager):
        started: list = []  # every kernel this process started, newest last: the watchdog's kernel is the last

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self._ipc_dir = tempfile.mkdtemp(prefix="hw3-kernel-")
            self.ip = os.path.join(self._ipc_dir, "ipc")
            self.stacks = stacks
            LocalKernelManager.started.append(self)

        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", kernel.__name__, "--here", "-f", self.connection_file]  # papermill's cwd

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            env = dict(kw.get("env") or os.environ)
            env[STACKS_ENV] = str(self.stacks)
            kw["env"] = env
            # what the kernel process writes outside its cells (ipykernel's own warnings, a DataLoader worker's
            # complaint as the kernel is stopped) goes to a file beside the notebook, not between the run's lines
            with open(kernel_log(self.stacks), "ab") as log:
                kw["stdout"] = kw["stderr"] = log
                return await super()._async_launch_kernel(kernel_cmd, **kw)

        @property
        def process(self):
            return getattr(self.provisioner, "process", None)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)

    return LocalKernelManager


class CellWatchdog:
    """Bounds every cell of one notebook's run. nbclient's hooks say when a cell starts and ends; a thread checks
    every second. A cell that runs past ``seconds``: its kernel is asked for its Python stacks (SIGUSR1, written to
    the stacks file), then killed with its children, which ends nbclient's wait (``DeadKernelError``).
    ``kernel_process()`` returns the kernel's ``Popen`` (its exit status after a death)."""

    def __init__(self, seconds: float | None, kernel_process, stacks: Path):
        self.seconds, self.kernel_process, self.stacks = seconds, kernel_process, stacks
        self.cell: tuple[int, float] | None = None  # (cell index, start) of the running cell
        self.timed_out: int | None = None  # the index of the cell that was stopped
        self.last_cell: int | None = None
        self.process = None  # the kernel's Popen, kept after nbclient has let it go
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def hooks(self) -> dict:
        def start(cell, cell_index, **_):
            self.cell, self.last_cell = (cell_index, time.monotonic()), cell_index

        def done(cell, cell_index, **_):
            self.cell = None

        return {"on_cell_execute": start, "on_cell_executed": done}

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.process = self.kernel_process() or self.process
            running = self.cell
            if self.seconds and running and time.monotonic() - running[1] > self.seconds and self.process:
                self.timed_out = running[0]
                self._stop_kernel(self.process)
                return

    def _stop_kernel(self, process) -> None:
        try:
            size = self.stacks.stat().st_size if self.stacks.is_file() else 0
            os.kill(process.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5  # the stacks are written by the kernel's signal handler: at once
            while time.monotonic() < deadline and (not self.stacks.is_file() or self.stacks.stat().st_size == size):
                time.sleep(0.1)
            time.sleep(0.2)
        except OSError:
            pass
        _kill_all(_family(process.pid))

    def __enter__(self) -> "CellWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def where_it_was(stacks: Path) -> str:
    """The innermost frame of the kernel's main thread in a faulthandler dump, and the innermost frame of notebook
    code (a cell), e.g. ``"viz.py:120 in attention_browser, from cell line 3"``; "" when there is no dump."""
    if not stacks.is_file():
        return ""
    text = stacks.read_text(errors="replace")
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    main = [b for b in blocks if b.lstrip().startswith("Current thread")]
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', (main or blocks)[-1])
    if not frames:
        return ""
    file, line, func = frames[0]
    where = f"{Path(file).name}:{line} in {func}"
    cell = next(((f, n) for f, n, _ in frames if "ipykernel_" in f or f.startswith("<ipython")), None)
    if cell and cell[0] != file:
        where += f", from the cell's line {cell[1]}"
    return where


class PeakMemory:
    """Peak memory of one notebook's run, sampled every ``interval`` seconds in a thread while it executes.

    * ``peak_gpu_gib``: the GPUs' used memory (``nvidia-smi``, all cards summed) above what was in use when the
      notebook started: the kernel's tensors, its allocator's cache and its CUDA context. PyTorch's allocator keeps
      freed blocks while the card has room, so on a large card this is an upper bound; the runner also records
      ``torch_allocated_gib`` (what the tensors needed at most) from the kernel. None where there is no
      ``nvidia-smi``.
    * ``peak_pss_gib``: the proportional set size of this process's children (the notebook's runner, its kernel
      and the kernel's DataLoader workers): each page counted once, shared pages split between the processes that map them. This is what the
      notebook needs of the machine's RAM. ``peak_rss_gib``, their summed resident memory, counts a page shared by a
      kernel and its forked workers once per process; it is kept for comparison. Where PSS cannot be read (no
      ``/proc``), it falls back to RSS. ``peak_pss_anon_gib`` is its anonymous part: the pages that only RAM (or
      swap) can hold, without the files a process maps (model weights read through ``mmap``), which the system can
      drop and read again.
    """

    def __init__(self, interval: float = 0.5, pss_interval: float = 5.0, growth: float = 1.1):
        self.interval, self.pss_interval, self.growth = interval, pss_interval, growth
        self.peak_gpu, self.peak_rss, self.peak_pss, self.peak_pss_anon = None, 0, 0, 0
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

    @staticmethod
    def _pss(process) -> tuple[int, int]:
        """(PSS, anonymous PSS) of one process: ``/proc/PID/smaps_rollup`` where the kernel has it (Linux >= 4.14;
        ``Pss_Anon`` from 5.8), else psutil's PSS (or RSS) for both."""
        try:
            text = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
            kb = {k.strip(): int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in text.splitlines()[1:]
                                                                  if ":" in line) if v.strip().endswith("kB")}
            if "Pss" in kb:
                return kb["Pss"], kb.get("Pss_Anon", kb["Pss"])
        except (OSError, ValueError):
            pass
        info = process.memory_full_info() if sys.platform.startswith("linux") else process.memory_info()
        pss = getattr(info, "pss", info.rss)
        return pss, pss

    @classmethod
    def _host_memory(cls, with_pss: bool) -> tuple[int, int | None, int | None]:
        """(summed RSS, summed PSS, summed anonymous PSS; None, None without ``with_pss``) of this process's
        children, recursively."""
        import psutil

        rss, pss, anon = 0, 0 if with_pss else None, 0 if with_pss else None
        for child in psutil.Process().children(recursive=True):
            try:
                rss += child.memory_info().rss
                if with_pss:
                    p, a = cls._pss(child)
                    pss, anon = pss + p, anon + a
            except psutil.Error:
                continue
        return rss, pss, anon

    def _run(self) -> None:
        """RSS every ``interval``. PSS walks each process's page tables (/proc/PID/smaps_rollup, about 50 ms for a
        1 GB kernel on 2 busy cores, holding the kernel's memory lock while it reads), so it is read only when the
        summed RSS could hold a new peak (a process's PSS never exceeds its RSS), and then every ``pss_interval``
        or as soon as the RSS has grown by ``growth`` since the last reading. Read every half second, it slowed the
        demo's notebook 02 by a quarter on 2 cores; read every 5 s only, it missed the peak of loading LLaVA in
        4-bit, which lasts a few seconds (2.5 to 14.4 GiB in three runs of the same notebook)."""
        last_pss, rss_then = float("-inf"), 0
        while not self._stop.is_set():
            rss, _, _ = self._host_memory(False)
            due = time.monotonic() - last_pss >= self.pss_interval or rss > rss_then * self.growth
            if due and rss > self.peak_pss:
                rss, pss, anon = self._host_memory(True)
                self.peak_pss, self.peak_pss_anon = max(self.peak_pss, pss), max(self.peak_pss_anon, anon)
                last_pss, rss_then = time.monotonic(), rss
            self.peak_rss = max(self.peak_rss, rss)
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
                "peak_pss_gib": round(self.peak_pss / gib, 2), "peak_pss_anon_gib": round(self.peak_pss_anon / gib, 2),
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


WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _export_html(notebook: Path, html: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb.cells:  # a widget's state is not saved: its text stand-in ("VBox(children=...") says nothing
        for output in cell.get("outputs", []):
            if WIDGET_MIME in output.get("data", {}):
                output["data"] = {"text/html": "<p><em>(an interactive widget: it runs in a live kernel, e.g. "
                                               "<code>hw3 lab</code>)</em></p>"}
    body, _ = HTMLExporter().from_notebook_node(nb)
    with atomic_path(html) as tmp:
        tmp.write_text(body, encoding="utf-8")



if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
