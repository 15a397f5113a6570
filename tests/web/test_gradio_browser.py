"""The web demos: the txt2img page driven in a real headless Chromium (type a prompt, press
Generate, an image comes back), and every demo's page and handler on tiny models. Skipped where
gradio (or, for the browser test, playwright or Chromium) is missing; .ci/install-browser installs them."""
import contextlib
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
import torch
from PIL import Image
from tiny_models import controlnet_config, depth_config, upscale_config

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


@contextlib.contextmanager
def serving(demo, flags, tmp_path):
    """``scripts/gradio/<demo>.py`` with ``flags`` on a free localhost port; yields its URL."""
    port = free_port()
    log = tmp_path / f"{demo}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "gradio" / f"{demo}.py"), *map(str, flags),
               "--device", "cpu", "--port", str(port)]
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


@contextlib.contextmanager
def browser_page():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                                                       "(.ci/install-browser)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Chromium is not installed (.ci/install-browser)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def shown_images(page, selector):
    """(src, width, height) of the loaded images under ``selector``, once there is one."""
    page.wait_for_function(
        f"() => [...document.querySelectorAll('{selector} img')].some(im => im.complete && im.naturalWidth > 0)",
        timeout=GENERATE_SECONDS * 1000)
    images = page.eval_on_selector_all(f"{selector} img",
                                       "ims => ims.map(im => [im.src, im.naturalWidth, im.naturalHeight])")
    return [(src, w, h) for src, w, h in images if w > 0]


def test_prompt_to_image_in_the_browser(tiny_files, tmp_path):
    with serving("txt2img", ["--ckpt", tiny_files.ckpt, "--config", tiny_files.config], tmp_path) as url, \
            browser_page() as page:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("Prompt", exact=True).fill("a red circle on a white background")
        page.get_by_role("button", name="Generate").click()
        shown = shown_images(page, "#result")
    assert shown
    src, width, height = shown[0]
    assert src.startswith(("data:image/", url)), src
    assert (width, height) == (16, 16)    # the tiny model's native size


def test_hint_to_image_in_the_browser(tiny, tmp_path):
    """The ControlNet page: upload a mask as the hint, generate, and the image and the hint used come back."""
    model = tiny.build(controlnet_config())
    torch.save({"state_dict": model.state_dict()}, tmp_path / "control_tiny.ckpt")
    config = tiny.write_config(controlnet_config(), tmp_path / "control_tiny.yaml")
    mask_path = tmp_path / "mask.png"
    box_mask(64).save(mask_path)
    with serving("controlnet", ["--ckpt", tmp_path / "control_tiny.ckpt", "--config", config], tmp_path) as url, \
            browser_page() as page:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("Prompt", exact=True).fill("a red square")
        page.locator("input[type=file]").first.set_input_files(str(mask_path))
        page.wait_for_function("() => document.querySelectorAll('img').length > 0", timeout=60000)
        page.get_by_role("button", name="Generate").click()
        results = shown_images(page, "#result")
        hints = shown_images(page, "#hint")
    assert [(w, h) for _, w, h in results][:1] == [(16, 16)]
    assert [(w, h) for _, w, h in hints] == [(64, 64)]    # 8x the 8x8 latent


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


def box_mask(side):
    """A white square on black: where the shape goes, as the shapes ControlNet's hints are."""
    mask = np.zeros((side, side, 3), dtype=np.uint8)
    mask[side // 4:side // 2, side // 4:3 * side // 4] = 255
    return Image.fromarray(mask)


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


def test_controlnet_page_steers_with_the_hint_and_shows_it(monkeypatch, tiny):
    model = tiny.build(controlnet_config(), seed=1)   # random zero convs: the hint changes the image
    demo = load_demo("controlnet", monkeypatch)
    args = demo_args(demo)
    assert isinstance(demo.build(args, model=model), gr.Blocks)
    generate = demo.make_generate(model, args)
    images, hint = generate(*SETTINGS, box_mask(32), "none", 1.0, False)
    assert images[0].size == (16, 16) and hint.size == (64, 64)     # the hint is made at 8x the latent
    off, _ = generate(*SETTINGS, box_mask(32), "none", 0.0, False)
    other, _ = generate(*SETTINGS, box_mask(32).transpose(Image.Transpose.FLIP_TOP_BOTTOM), "none", 1.0, False)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))     # the hint steers
    assert not np.array_equal(np.asarray(images[0]), np.asarray(off[0]))       # at the strength given
    with pytest.raises(gr.Error, match="upload an image first"):
        generate(*SETTINGS, None, "none", 1.0, False)
    with pytest.raises(gr.Error, match="blank"):
        generate(*SETTINGS, Image.new("RGB", (32, 32)), "none", 1.0, False)


def test_controlnet_demo_flags_are_checked(monkeypatch, capsys):
    demo = load_demo("controlnet", monkeypatch)
    assert demo.main(["--control", "c.safetensors", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --control needs --ckpt, the base checkpoint the ControlNet is attached to"]
