"""Run the workbook: every notebook in order with papermill, HTML reports with nbconvert, one metrics.json.

A config (``configs/demo.yaml``) names the profile, the output folder, the notebooks and a flat block of
parameters. Each notebook receives the parameters that its ``parameters`` cell declares; a parameter that no
notebook declares is an error (a typo would otherwise be silently ignored).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .report import merge_metrics

ROOT = Path(__file__).resolve().parents[1]


class WorkbookError(RuntimeError):
    """A notebook failed or the config is wrong; the message names the notebook and the cell."""


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
            raise WorkbookError(f"{path}: cannot read the config ({e})") from None
        allowed = {"profile", "output_dir", "notebooks", "parameters", "demo_world"}
        if not isinstance(raw, dict) or set(raw) - allowed or "profile" not in raw:
            raise WorkbookError(f"{path}: a config is a mapping with 'profile' and any of {sorted(allowed)}; "
                                f"got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        params = raw.get("parameters") or {}
        bad = {k: type(v).__name__ for k, v in params.items() if not isinstance(v, (str, int, float, bool, type(None)))}
        if bad:
            raise WorkbookError(f"{path}: parameters must be flat primitives (str, int, float, bool, null); {bad}")
        return cls(profile=raw["profile"], output_dir=Path(raw.get("output_dir", f"outputs/{raw['profile']}")),
                   notebooks=list(raw.get("notebooks") or []), parameters=params,
                   demo_world=bool(raw.get("demo_world", False)))


def notebook_path(name: str) -> Path:
    return ROOT / "notebooks" / f"{name}.ipynb"


def _declared(nb: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(nb))


def run(config: WorkbookConfig, only: list[str] | None = None, html: bool = True, log=print) -> dict:
    """Execute the config's notebooks (or ``only`` these) and return the merged metrics."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    names = [n for n in config.notebooks if not only or n in only]
    missing = [n for n in names if not notebook_path(n).is_file()]
    if missing:
        raise WorkbookError(f"notebooks not found: {[str(notebook_path(n)) for n in missing]}")
    declared = {n: _declared(notebook_path(n)) for n in names}
    unknown = sorted(set(config.parameters) - {p for d in declared.values() for p in d})
    if unknown and not only:
        raise WorkbookError(f"parameters {unknown} are declared by none of the notebooks {names}")
    if config.demo_world:
        from .demo import ensure_demo_data

        ensure_demo_data(log=log)
    out = ROOT / config.output_dir if not config.output_dir.is_absolute() else config.output_dir
    # kernels inherit the environment: an MPLBACKEND such as Agg would keep every figure out of the notebooks
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    (out / "report").mkdir(parents=True, exist_ok=True)
    timings = {}
    for name in names:
        params = {k: v for k, v in config.parameters.items() if k in declared[name]}
        if "output_dir" in declared[name]:
            params["output_dir"] = str(out)
        target = out / f"{name}.ipynb"
        log(f"[{config.profile}] running {name} ...")
        t0 = time.time()
        try:
            papermill.execute_notebook(str(notebook_path(name)), str(target), parameters=params, cwd=str(ROOT),
                                       kernel_name="python3", progress_bar=False, log_output=False)
        except PapermillExecutionError as e:
            first_line = next((line for line in (e.source or "").splitlines() if line.strip()), "")
            raise WorkbookError(f"{name}.ipynb failed in cell [{e.exec_count}] ({first_line[:60]!r}): {e.ename}: "
                                f"{e.evalue}; the executed notebook with the traceback is {target}") from None
        timings[name] = round(time.time() - t0, 1)
        if html:
            _export_html(target, out / "report" / f"{name}.html")
        log(f"[{config.profile}] {name} done in {timings[name]:.0f}s")
    merged = merge_metrics(out, {"profile": config.profile, "notebook_seconds": timings})
    log(f"[{config.profile}] metrics: {out / 'metrics.json'}; reports: {out / 'report'}")
    return merged


def _export_html(notebook: Path, html: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    tmp = html.with_name(f".{html.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(html)

