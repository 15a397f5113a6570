"""The web demos: the txt2img page driven in a real headless Chromium (type a prompt, press
Generate, an image comes back), and every demo's page and handler on tiny models. Skipped where
gradio (or, for the browser test, playwright or Chromium) is missing; .ci/install-browser installs them."""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_models import depth_config, upscale_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_SECONDS = 180
GENERATE_SECONDS = 180

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[web]'; see .ci/install-browser)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url, process, log):
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"the demo did not answer at {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def txt2img_demo(tiny_files, tmp_path):
    """The txt2img demo on a free localhost port with the tiny checkpoint; yields its URL."""
    port = free_port()
    log = tmp_path / "demo.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "gradio" / "txt2img.py"), "--ckpt", str(tiny_files.ckpt),
               "--config", str(tiny_files.config), "--device", "cpu", "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_prompt_to_image_in_the_browser(txt2img_demo):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                                                       "(.ci/install-browser)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Chromium is not installed (.ci/install-browser)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(txt2img_demo, wait_until="domcontentloaded")
            prompt = page.get_by_label("Prompt", exact=True)
            prompt.fill("a red circle on a white background")
            page.get_by_role("button", name="Generate").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#result img')].some(im => im.complete && im.naturalWidth > 0)",
                timeout=GENERATE_SECONDS * 1000)
            images = page.eval_on_selector_all(
                "#result img", "ims => ims.map(im => [im.src, im.naturalWidth, im.naturalHeight])")
        finally:
            browser.close()
    shown = [(src, w, h) for src, w, h in images if w > 0]
    assert shown, images
    src, width, height = shown[0]
    assert src.startswith(("data:image/", txt2img_demo)), src
    assert (width, height) == (16, 16)    # the tiny model's native size


# ------------------------------------------------------------------------------------------- every demo, no browser
def load_demo(name, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts" / "gradio"))
    spec = importlib.util.spec_from_file_location(f"demo_{name}", REPO_ROOT / "scripts" / "gradio" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_args(module):
    """Flags naming some checkpoint (the model itself is passed in), so the official defaults apply."""
    return sys.modules["webui"].parse_args("test", ["--ckpt", "x.ckpt", "--config", "x.yaml", "--device", "cpu"])


def rgb(w, h):
    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8))


SETTINGS = ("a red circle", "", 2, 3.0, 7, 1, "DDIM", "Automatic")   # prompt, negative, steps, scale, seed, images,
#                                                                   sampler, schedule type


def test_txt2img_and_img2img_pages(monkeypatch, tiny_model):
    for name, extra, size in (("txt2img", (16, 24), (24, 16)), ("img2img", (rgb(64, 64), 0.5), (64, 64))):
        demo = load_demo(name, monkeypatch)
        args = demo_args(demo)
        assert isinstance(demo.build(args, model=tiny_model), gr.Blocks)
        images = demo.make_generate(tiny_model, args)(*SETTINGS, *extra)
        assert [im.size for im in images] == [size]
    with pytest.raises(gr.Error, match="upload an image first"):
        demo.make_generate(tiny_model, args)(*SETTINGS, None, 0.5)


def test_inpainting_page_takes_the_painted_layer_as_the_mask(monkeypatch, tiny_model):
    demo = load_demo("inpainting", monkeypatch)
    args = demo_args(demo)
    assert isinstance(demo.build(args, model=tiny_model), gr.Blocks)
    generate = demo.make_generate(tiny_model, args)
    background = rgb(16, 16)
    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[4:12, 4:12] = 255
    images = generate(*SETTINGS, {"background": background, "layers": [Image.fromarray(layer)], "composite": None})
    got, original = np.asarray(images[0]), np.asarray(background)
    outside = np.ones((16, 16), dtype=bool)
    outside[4:12, 4:12] = False
    assert np.array_equal(got[outside], original[outside]) and not np.array_equal(got[~outside], original[~outside])
    with pytest.raises(gr.Error, match="paint over"):
        generate(*SETTINGS, {"background": background, "layers": [], "composite": None})


def test_depth_and_upscaling_pages(monkeypatch, tiny):
    depth_model, upscale_model = tiny.build(depth_config()), tiny.build(upscale_config())
    demo = load_demo("depth2img", monkeypatch)
    args = demo_args(demo)
    assert isinstance(demo.build(args, model=depth_model), gr.Blocks)
    ramp = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)))
    images, depth = demo.make_generate(depth_model, args)(*SETTINGS, rgb(16, 16), 0.5, ramp)
    assert images[0].size == depth.size == (16, 16)
    with pytest.raises(gr.Error, match="depth map"):   # random MiDaS without weights: needs a depth map
        demo.make_generate(depth_model, args)(*SETTINGS, rgb(16, 16), 0.5, None)
    demo = load_demo("upscaling", monkeypatch)
    args = demo_args(demo)
    assert isinstance(demo.build(args, model=upscale_model), gr.Blocks)
    images = demo.make_generate(upscale_model, args)(*SETTINGS, rgb(12, 8), 20, 4)
    assert images[0].size == (24, 16)
    with pytest.raises(gr.Error, match="out of range"):
        demo.make_generate(upscale_model, args)(*SETTINGS, rgb(12, 8), 351, 4)


@pytest.mark.parametrize("name, message", [("depth2img", "needs a depth-to-image model"),
                                           ("upscaling", "needs an x4 upscaling model")])
def test_family_demos_refuse_the_shipped_model(monkeypatch, capsys, name, message):
    demo = load_demo(name, monkeypatch)
    assert demo.main(["--port", str(free_port())]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and "--config" in err[0]


def test_bad_port_is_one_line(monkeypatch, capsys):
    demo = load_demo("txt2img", monkeypatch)
    assert demo.main(["--port", "70000"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --port must be from 1 to 65535, got 70000"]
