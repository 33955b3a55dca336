import json
import os

import nbformat
import pytest

import hw3lib.workbook as wb
from hw3lib.workbook import WorkbookConfig, WorkbookError


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i, (tag, src) in enumerate(cells):
        cell = nbformat.v4.new_code_cell(src)
        if tag:
            cell.metadata["tags"] = [tag]
        nb.cells.append(cell)
    nbformat.write(nb, str(path))


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setattr(wb, "ROOT", tmp_path)
    _notebook(tmp_path / "notebooks/01_ok.ipynb", [
        ("parameters", "value = 1\noutput_dir = 'x'"),
        (None, "from hw3lib.report import save_metrics\nsave_metrics(output_dir, 'ok', {'value': value * 2})"),
    ])
    _notebook(tmp_path / "notebooks/02_fails.ipynb", [
        ("parameters", "output_dir = 'x'"),
        (None, "x = 1"),
        (None, "raise ValueError('planted failure')"),
    ])
    return tmp_path


def test_runs_notebooks_and_merges_metrics(fake_root):
    cfg = WorkbookConfig(profile="t", output_dir=fake_root / "out", notebooks=["01_ok"], parameters={"value": 21})
    merged = wb.run(cfg, log=lambda *_: None)
    assert merged["ok"] == {"value": 42} and merged["profile"] == "t"
    assert json.loads((fake_root / "out/metrics.json").read_text())["ok"]["value"] == 42
    assert (fake_root / "out/01_ok.ipynb").is_file()
    html = (fake_root / "out/report/01_ok.html").read_text()
    assert "save_metrics" in html
    cost = merged["notebook_cost"]["01_ok"]  # each notebook's time and memory, a run with --only adds to it
    assert cost["seconds"] > 0 and cost["peak_rss_gib"] > 0.01 and "device" in cost
    assert merged["notebook_seconds"] == {"01_ok": cost["seconds"]}


def test_parameters_override_as_papermill_types_them():
    cfg = WorkbookConfig("t", "o", ["01_ok"], {"data_root": "hw3_data", "lr": 0.001})
    cfg.override([["data_root", "/data/hw3_data"], ["lr", "1e-4"], ["num_epochs", "2"], ["flag", "True"],
                  ["none", "None"], ["name", "ViT-B-32"]])
    assert cfg.parameters == {"data_root": "/data/hw3_data", "lr": 1e-4, "num_epochs": 2, "flag": True,
                              "none": None, "name": "ViT-B-32"}


def test_failing_notebook_names_notebook_and_cell(fake_root):
    cfg = WorkbookConfig(profile="t", output_dir=fake_root / "out", notebooks=["01_ok", "02_fails"])
    # [4]: the number shown in the executed notebook, where papermill's injected-parameters cell comes first
    with pytest.raises(WorkbookError, match=r"02_fails\.ipynb failed in cell \[4\] \(\"raise ValueError\('planted "
                                            r"failure'\)\"\): ValueError: planted failure"):
        wb.run(cfg, html=False, log=lambda *_: None)


def test_unknown_parameter_and_missing_notebook(fake_root):
    with pytest.raises(WorkbookError, match=r"parameters \['valu'\] are declared by none"):
        wb.run(WorkbookConfig("t", fake_root / "o", ["01_ok"], {"valu": 1}), log=lambda *_: None)
    with pytest.raises(WorkbookError, match="notebooks not found"):
        wb.run(WorkbookConfig("t", fake_root / "o", ["09_nope"]), log=lambda *_: None)


def test_config_files(tmp_path):
    for name in ("demo", "hw3", "hw3-24gb", "hw3-12gb"):
        cfg = WorkbookConfig.load(wb.ROOT / "configs" / f"{name}.yaml")
        assert cfg.profile == name.split("-")[0] and cfg.notebooks
        for nb in cfg.notebooks:
            assert wb.notebook_path(nb).is_file()
    (tmp_path / "bad.yaml").write_text("profile: x\nparameters:\n  nested: {a: 1}\n")
    with pytest.raises(WorkbookError, match=r"bad\.yaml: parameters must be flat"):
        WorkbookConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("profile: x\nnotebook: [a]\n")
    with pytest.raises(WorkbookError, match=r"typo\.yaml: a config is a mapping"):
        WorkbookConfig.load(tmp_path / "typo.yaml")


def _hw3_run(config, *args, timeout=180, env=None):
    """``hw3 run`` in its own process, as a user runs it: (exit status, stderr, seconds)."""
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "hw3lib", "run", "-f", str(config), "--no-html", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    said = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()
            and not line.startswith("Executing:")]  # papermill's progress bar
    return done.returncode, "\n".join(said), time.monotonic() - t0


def _one_notebook_config(tmp_path, name, cells, **extra):
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir(exist_ok=True)
    _notebook(nb_dir / f"{name}.ipynb", [("parameters", "output_dir = 'x'"), *cells])
    config = tmp_path / "config.yaml"
    config.write_text("\n".join(["profile: t", f"output_dir: {tmp_path / 'out'}", "notebooks_dir: nbs",
                                 f"notebooks: [{name}]", *(f"{k}: {v}" for k, v in extra.items())]) + "\n")
    return config


def test_a_hung_cell_is_stopped_within_its_bound_with_one_line(tmp_path):
    import psutil

    config = _one_notebook_config(tmp_path, "hangs", [(None, "import time\n\ntime.sleep(600)")], cell_timeout=4)
    mark = {"HW3_TEST_RUN": str(tmp_path)}  # its kernel inherits it; another test's kernels (a parallel worker) do not
    status, err, seconds = _hw3_run(config, env={**os.environ, **mark})
    assert status == 1 and seconds < 60, (status, seconds, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hw3 run: hangs.ipynb: a cell ran past the 4 s bound (cell_timeout)"), err
    assert "in cell 3 of 3 ('import time')" in err and ":3 in <module>" in err, err  # the cell's line 3: the sleep
    stacks = tmp_path / "out/hangs.stacks.txt"
    assert "Current thread" in stacks.read_text() and str(stacks) in err
    assert (tmp_path / "out/hangs.ipynb").is_file()  # the executed notebook, up to the cell that hung
    left = [p for p in psutil.process_iter(["cmdline"]) if "hw3lib.kernel" in " ".join(p.info["cmdline"] or [])
            and _environ(p).get("HW3_TEST_RUN") == mark["HW3_TEST_RUN"]]
    assert not left  # no kernel left behind


def _environ(process) -> dict:
    import psutil

    try:
        return process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended meanwhile
        return {}


def test_the_command_line_bound_overrides_the_config(tmp_path):
    config = _one_notebook_config(tmp_path, "slow", [(None, "import time\ntime.sleep(600)")])
    status, err, seconds = _hw3_run(config, "--cell-timeout", "3")
    assert status == 1 and "past the 3 s bound" in err and seconds < 60, err


@pytest.mark.parametrize("how, said", [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "its kernel died (killed by SIGKILL: out of host "
                                                                 "memory?) in cell 3 of 3 ('import os, signal')"),
    ("import ctypes\nctypes.string_at(0)", "its kernel died (killed by SIGSEGV) in cell 3 of 3 ('import ctypes'); "
                                           "it was at "),
])
def test_a_dead_kernel_is_one_line(tmp_path, how, said):
    config = _one_notebook_config(tmp_path, "dies", [(None, how)])
    status, err, _ = _hw3_run(config)
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert f"hw3 run: dies.ipynb: {said}" in err, err


def test_what_the_kernel_itself_says_goes_to_its_log_not_between_the_runs_lines(tmp_path):
    """ipykernel's own messages (its logger writes to the process's stderr, outside any cell) are kept beside the
    executed notebook; the run says where, in its one line."""
    words = "the kernel's own words"
    config = _one_notebook_config(tmp_path, "dies", [(None, f"import os, signal\nfrom ipykernel.kernelapp import "
                                                           f"IPKernelApp\nIPKernelApp.instance().log.warning({words!r})"
                                                           f"\nos.kill(os.getpid(), signal.SIGKILL)")])
    status, err, _ = _hw3_run(config)
    log = tmp_path / "out/dies.kernel.log"
    assert status == 1 and len(err.strip().splitlines()) == 1 and words not in err, err
    assert words in log.read_text() and f"its own output: {log}" in err, err


def test_cell_timeout_in_a_config_is_checked(tmp_path):
    config = _one_notebook_config(tmp_path, "x", [], cell_timeout="soon")
    with pytest.raises(wb.ConfigError, match="cell_timeout must be a number of seconds"):
        WorkbookConfig.load(config)


def test_card_configs_extend_the_80_gb_one(tmp_path):
    big = WorkbookConfig.load(wb.ROOT / "configs/hw3.yaml")
    small = WorkbookConfig.load(wb.ROOT / "configs/hw3-12gb.yaml")
    assert small.parameters["llava_load_in_4bit"] is True and small.output_dir.name == "hw3-12gb"
    assert small.notebooks == big.notebooks
    same = {k: v for k, v in small.parameters.items() if k in big.parameters and big.parameters[k] == v}
    assert same["llava_model"] == "llava-hf/llava-1.5-7b-hf" and same["num_epochs"] == big.parameters["num_epochs"]
    # a student's card trains and captions for an hour or more in one cell: the bound is the 80 GB config's, inherited
    assert small.cell_timeout == big.cell_timeout == 14400 and same["llava_cache"] == "static+graphs"
    assert WorkbookConfig.load(wb.ROOT / "configs/demo.yaml").cell_timeout == 1800
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nprofile: x\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nprofile: y\n")
    with pytest.raises(wb.ConfigError, match="goes round in a circle"):
        WorkbookConfig.load(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\nprofile: x\n")
    with pytest.raises(wb.ConfigError, match="missing.yaml: cannot read the config"):
        WorkbookConfig.load(tmp_path / "c.yaml")


def test_out_of_memory_in_a_notebook_says_what_to_lower(tmp_path):
    raise_oom = ("import torch\nraise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 200.00 MiB. "
                 "GPU 0 has a total capacity of 139.80 GiB of which 80.12 GiB is free. Including non-PyTorch memory, "
                 "this process has 22.01 GiB memory in use. Of the allocated memory 17.20 GiB is allocated by "
                 "PyTorch, and 4.31 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory "
                 "is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.')")
    config = _one_notebook_config(tmp_path, "01_llava_prompts", [(None, raise_oom)])
    status, err, _ = _hw3_run(config)
    assert status == 1 and len(err.splitlines()) == 1, err
    assert ("01_llava_prompts.ipynb failed in cell [3] ('import torch'): OutOfMemoryError: out of GPU memory: tried "
            "to allocate 200.00 MiB with 17.20 GiB in use and 4.31 GiB cached but free; lower llava_batch_size "
            "(-p llava_batch_size 4)") in err, err
    assert "expandable_segments" not in err
    from hw3lib.workbook import oom_head  # torch's wording when CUDA graphs hold memory of their own

    graphs = ("CUDA out of memory. Tried to allocate 2.00 MiB. Of the allocated memory 17.20 GiB is allocated by "
              "PyTorch, with 3.50 GiB allocated in private pools (e.g., CUDA Graphs), and 4.31 GiB is reserved by "
              "PyTorch but unallocated.")
    assert oom_head(graphs, "22") == ("out of GPU memory (PyTorch capped at 22 GiB): tried to allocate 2.00 MiB with "
                                      "17.20 GiB in use (3.50 GiB of it in CUDA graphs' pools) and 4.31 GiB cached "
                                      "but free")


def test_every_notebooks_parameters_are_checked_before_the_first_starts(fake_root):
    _notebook(fake_root / "notebooks/03_typed.ipynb", [
        ("parameters", "count: int = 1\nnames: dict = {}\noutput_dir: str = 'x'"),
        (None, "from hw3lib.report import save_metrics\nsave_metrics(output_dir, 'typed', {'names': names})"),
    ])
    out = fake_root / "out"
    cfg = WorkbookConfig(profile="t", output_dir=out, notebooks=["01_ok", "03_typed"])
    cfg.override([["count", "abc"]])
    with pytest.raises(wb.ConfigError, match=r"parameter 'count' must be int, got 'abc' \(str\) \(declared by "
                                             r"03_typed\)"):
        wb.run(cfg, html=False, log=lambda *_: None)
    assert not (out / "01_ok.ipynb").exists()  # nothing ran: 01 comes first and would have run
    cfg = WorkbookConfig(profile="t", output_dir=out, notebooks=["01_ok", "03_typed"])
    cfg.override([["names", '{"detailed": "Describe the image in detail."}'], ["count", "2"]])
    merged = wb.run(cfg, html=False, only=["03_typed"], log=lambda *_: None)  # a dict from the command line
    assert merged["typed"] == {"names": {"detailed": "Describe the image in detail."}}
    cfg.override([["names", "[1, 2"]])
    with pytest.raises(wb.ConfigError, match="parameter 'names' .*dict expected, and the text is not YAML"):
        wb.run(cfg, html=False, only=["03_typed"], log=lambda *_: None)


def test_a_misspelt_override_is_an_error_with_only_too(fake_root):
    cfg = WorkbookConfig(profile="t", output_dir=fake_root / "out", notebooks=["01_ok", "02_fails"],
                         parameters={"value": 1})
    cfg.override([["valeu", "3"]])
    with pytest.raises(wb.ConfigError, match=r"parameters \['valeu'\] are declared by none of the notebooks"):
        wb.run(cfg, html=False, only=["02_fails"], log=lambda *_: None)
    with pytest.raises(wb.ConfigError, match="-p output_dir: the output folder is the config's output_dir"):
        cfg.override([["output_dir", "elsewhere"]])


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_run_its_kernel_and_says_how_to_go_on(tmp_path, how):
    """Ctrl-C, or `kill PID` (SIGTERM): the run stops, and so do its runner and its kernel."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    config = _one_notebook_config(tmp_path, "hangs", [(None, "import time\ntime.sleep(600)")])
    # as from a terminal: a shell that starts a job in the background (CI, `cmd &`) makes it ignore SIGINT
    run = subprocess.Popen([sys.executable, "-m", "hw3lib", "run", "-f", str(config), "--no-html"],
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        kernels = []
        while time.monotonic() < deadline and not kernels:  # until the kernel runs the cell
            time.sleep(1)
            kernels = [p for p in psutil.Process(run.pid).children(recursive=True)
                       if "hw3lib.kernel" in " ".join(p.cmdline())]
        assert kernels, "no kernel started"
        time.sleep(3)
        t0 = time.monotonic()
        run.send_signal(getattr(signal, how))
        err = run.communicate(timeout=60)[1]
    finally:  # whatever happened, nothing of it outlives the test
        if run.poll() is None:
            for p in psutil.Process(run.pid).children(recursive=True) + [psutil.Process(run.pid)]:
                p.kill()
            run.wait()
    status, word = {"SIGINT": (130, "interrupted"), "SIGTERM": (143, "terminated")}[how]
    assert run.returncode == status and time.monotonic() - t0 < 30, (run.returncode, err)
    said = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hw3 run:")]
    assert said == [f"hw3 run: {word}: hangs stopped; its executed cells are in {tmp_path}/out/"
                    f"hangs.interrupted.ipynb; to go on: hw3 run -f CONFIG --only hangs"], err
    assert (tmp_path / "out/hangs.interrupted.ipynb").is_file() and not (tmp_path / "out/hangs.ipynb").exists()
    time.sleep(1)
    assert not [k for k in kernels if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


def test_jupyterlab_saves_the_workbooks_notebooks_clean(tmp_path):
    """hw3 lab's pre-save hook, through the server's own contents manager: autosave of notebooks/NN_name.ipynb
    keeps no outputs (the repository stays clean); any other notebook is saved as it is."""
    from jupyter_server.services.contents.filemanager import FileContentsManager

    from hw3lib.kernel import clean_on_save

    (tmp_path / "notebooks").mkdir()
    cm = FileContentsManager(root_dir=str(tmp_path))
    cm.pre_save_hook = clean_on_save
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1", execution_count=3,
                                     outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                                                     execution_count=3)])
    nb.cells.append(cell)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for path in ("notebooks/04_attention_maps.ipynb", "notebooks/mine.ipynb"):
        cm.save({"type": "notebook", "format": "json", "content": json.loads(json.dumps(nb))}, path)
    clean = nbformat.read(str(tmp_path / "notebooks/04_attention_maps.ipynb"), as_version=4)
    kept = nbformat.read(str(tmp_path / "notebooks/mine.ipynb"), as_version=4)
    assert clean.cells[0].outputs == [] and clean.cells[0].execution_count is None and "widgets" not in clean.metadata
    assert kept.cells[0].outputs and kept.cells[0].execution_count == 3
    # hw3 lab starts JupyterLab with this hook: tests/test_kernel.py


def test_peak_memory_counts_pss_and_its_anonymous_part(tmp_path):
    """PeakMemory's PSS of its children: 200 MB written into a bytearray (anonymous) and a 200 MB file read
    through mmap (file pages, which only PSS counts), each in a child process."""
    import subprocess
    import sys
    import time

    from hw3lib.workbook import PeakMemory

    big = tmp_path / "weights.bin"
    big.write_bytes(b"\1" * (200 << 20))
    anon = "x = bytearray(200 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\nimport time; time.sleep(30)"
    mapped = (f"import mmap\nf = open({str(big)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
              "s = sum(m[i] for i in range(0, len(m), 4096))\nimport time; time.sleep(30)")
    with PeakMemory(interval=0.1, pss_interval=0.2) as peak:
        children = [subprocess.Popen([sys.executable, "-c", code]) for code in (anon, mapped)]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (peak.peak_pss_anon > 200 << 20
                                                       and peak.peak_pss - peak.peak_pss_anon > 180 << 20):
                time.sleep(0.2)
        finally:
            for child in children:
                child.kill()
                child.wait()
    cost = peak.as_dict()
    assert cost["peak_pss_anon_gib"] >= 0.19 and cost["peak_pss_gib"] - cost["peak_pss_anon_gib"] >= 0.17, cost
    assert cost["peak_rss_gib"] >= cost["peak_pss_gib"] >= cost["peak_pss_anon_gib"]
