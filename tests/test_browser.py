"""Notebook 04's attention browser in a real front end: JupyterLab on 127.0.0.1 with the workbook's kernel, and
Debian's chromium driven by Playwright. The notebook runs on the demo world, then the test moves the word slider and
changes the layer and the model, and checks that the drawn map changes each time (its pixels, not the widget's
state). Screenshots go to outputs/browser_test/.

./run_tests.sh installs chromium; anywhere else without it this test fails with the apt command to run. Set
HW3_SKIP_BROWSER_TEST=1 to leave it out on purpose.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import papermill
import pytest
from PIL import Image

from hw3lib import kernel
from hw3lib.captioner import CaptionerConfig, EncoderConfig, build, course_files
from hw3lib.data import load_split
from hw3lib.decoder import LoraConfig
from hw3lib.train import TrainConfig, train
from hw3lib.workbook import ROOT

SHOTS = ROOT / "outputs/browser_test"


def _chromium() -> str:
    from hw3lib.handin import find_chromium

    if found := find_chromium():
        return found
    if os.environ.get("HW3_SKIP_BROWSER_TEST") == "1":
        pytest.skip("HW3_SKIP_BROWSER_TEST=1")
    pytest.fail("no chromium to drive: `apt-get install chromium` (or HW3_CHROMIUM=/path/to/chrome); "
                "HW3_SKIP_BROWSER_TEST=1 leaves this test out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(world, models_dir, tmp_path_factory):
    """JupyterLab serving a copy of notebook 04 (a quick adapter, 4 pointing images), isolated Jupyter dirs."""
    tmp = tmp_path_factory.mktemp("lab")
    recs = load_split(world / "p2_data/train.json", world / "p2_data/images/train")[:40]
    val = load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:4]
    cfg = CaptionerConfig(encoder=EncoderConfig(name=str(models_dir / "vit")),
                          lora=LoraConfig(r=4, alpha=8, targets=("c_attn",)), **course_files(world))
    model, encoder, transform = build(cfg, seed=0)
    result = train(model, encoder, transform, recs, val, TrainConfig(num_epochs=1, batch_size=32, captions_per_image=1),
                   tmp / "run", log=lambda *_: None, device="cpu")
    served = tmp / "served"
    served.mkdir()
    papermill.execute_notebook(str(ROOT / "notebooks/04_attention_maps.ipynb"), str(served / "04_attention_maps.ipynb"),
                               parameters={"adapter": str(result.best_path), "pointing_images": 4,
                                           "output_dir": str(tmp / "out")}, prepare_only=True)
    jupyter = tmp / "jupyter"
    (jupyter / "data/kernels/hw3").mkdir(parents=True)
    (jupyter / "data/kernels/hw3/kernel.json").write_text(json.dumps(kernel.spec()))  # what --install writes
    env = {**os.environ, "JUPYTER_DATA_DIR": str(jupyter / "data"), "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
           "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"), "JUPYTER_PATH": str(jupyter / "data"),
           "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "workspaces")}
    port, token = _free_port(), secrets.token_hex(16)
    argv = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
            "--ServerApp.port_retries=0"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = (tmp / "jupyterlab.log").open("w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                assert server.poll() is None, (tmp / "jupyterlab.log").read_text()[-2000:]
                time.sleep(0.5)
        yield {"url": url, "token": token, "out": tmp / "out"}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _changed(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference over the common area (0..255)."""
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return float(np.abs(a[:h, :w] - b[:h, :w]).mean())


def test_attention_browser_in_jupyterlab(lab):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(f"{lab['url']}/lab/tree/04_attention_maps.ipynb?token={lab['token']}")
        # the notebook's kernelspec names the workbook's kernel: JupyterLab starts it without asking
        page.locator(".jp-Toolbar-kernelName", has_text=kernel.DISPLAY_NAME).wait_for()
        page.locator(".jp-Notebook").click()
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

        image = page.locator("img.widget-image").first
        try:
            image.wait_for(timeout=int(os.environ.get("HW3_BROWSER_TIMEOUT", 240)) * 1000)  # ran up to the browser
        except Exception:
            page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
            raise
        image.scroll_into_view_if_needed()
        view = page.locator(".widget-vbox").first
        shots = {"before": image.screenshot()}
        view.screenshot(path=str(SHOTS / "attention_browser_before.png"))

        def redraws(action, name: str) -> float:
            old = image.get_attribute("src")
            t0 = time.time()
            action()
            page.wait_for_function("old => { const i = document.querySelector('img.widget-image');"
                                   " return i && i.complete && i.src !== old; }", arg=old, timeout=30_000)
            seconds = time.time() - t0
            shots[name] = image.screenshot()
            view.screenshot(path=str(SHOTS / f"attention_browser_{name}.png"))
            return seconds

        handle = page.locator(".widget-slider .noUi-handle").first
        handle.focus()
        t_word = redraws(lambda: handle.press("ArrowRight"), "after_word")
        selects = page.locator(".widget-dropdown select")
        t_layer = redraws(lambda: selects.nth(1).select_option(label="mean"), "after_layer")
        models = selects.nth(0).locator("option").evaluate_all("options => options.map(o => o.textContent.trim())")
        other = next((i for i, m in enumerate(models) if m.endswith("llava")), None)  # labels hold &nbsp;
        assert other is not None, f"no LLaVA entry among {models}"
        t_model = redraws(lambda: selects.nth(0).select_option(index=other), "after_model")

        # the last cell ran too (JupyterLab's Run All stops at an error)
        page.locator(".jp-CodeCell").last.locator(".jp-OutputArea-output").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SHOTS / "jupyterlab.png"))
        browser.close()

    pixels = {name: _png(png) for name, png in shots.items()}
    word = _changed(pixels["before"], pixels["after_word"])
    layer = _changed(pixels["after_word"], pixels["after_layer"])
    model = _changed(pixels["after_layer"], pixels["after_model"])
    print(f"\nredraw after the slider {t_word:.2f} s, the layer {t_layer:.2f} s, the model {t_model:.2f} s; "
          f"mean pixel change {word:.1f}, {layer:.1f}, {model:.1f}; screenshots in {SHOTS}")
    assert word > 1 and layer > 1 and model > 1, (word, layer, model)
    assert max(t_word, t_layer) < 10, "the browser redraws from the computed maps, without re-running the model"
    assert json.loads((lab["out"] / "metrics/attention.json").read_text())["p3_captions"]["llava"]
