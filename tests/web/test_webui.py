"""scripts/gradio/webui.py's page_handler: the handler Gradio sees takes the sampling controls, then
the demo's own inputs, then a progress tracker, and turns them into the demo's call."""
import importlib
import inspect
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[web]')")

GRADIO_DEMOS = Path(__file__).resolve().parents[2] / "scripts" / "gradio"
CONTROLS = ("a red circle", "blurry", 2.0, 3.0, 7.0, 1.0, "dpm++ 2m", "Karras")   # as Gradio's widgets give them


@pytest.fixture
def webui(monkeypatch):
    monkeypatch.syspath_prepend(str(GRADIO_DEMOS))
    return importlib.import_module("webui")


@pytest.fixture
def args(webui):
    return webui.parse_args("test", ["--no-watermark"])


def test_handler_signature_and_call(webui, args):
    calls = []

    @webui.page_handler(args)
    def generate(settings, image, strength):
        calls.append((settings, image, strength))
        return [Image.new("RGB", (8, 8))]

    params = inspect.signature(generate).parameters
    assert list(params) == [*webui.SAMPLING_INPUTS, "image", "strength", "progress"]
    assert isinstance(params["progress"].default, gr.Progress)
    images = generate(*CONTROLS, "the image", 0.5, params["progress"].default)   # Gradio adds the tracker last
    assert [im.size for im in images] == [(8, 8)]
    assert calls == [(dict(prompts="a red circle", negative_prompt="blurry", steps=2, scale=3.0, seed=7,
                           n_samples=1, sampler="dpmpp_2m", schedule="karras"), "the image", 0.5)]
    assert generate(*CONTROLS, "again", 0.25) and calls[-1][1:] == ("again", 0.25)   # as the tests call it


def test_gradio_finds_the_progress_tracker_after_the_inputs(webui, args):
    from gradio.helpers import special_args

    @webui.page_handler(args)
    def generate(settings, image):
        return []

    _, progress_index, _, _ = special_args(generate, inputs=[*CONTROLS, None])
    assert progress_index == len(CONTROLS) + 1


def test_extra_outputs_pass_through_and_errors_show_in_the_page(webui, args):
    from ldm.errors import UserError
    depth = Image.new("L", (8, 8))

    @webui.page_handler(args)
    def generate(settings, image):
        webui.require_image(image)
        return [Image.new("RGB", (8, 8))], depth

    images, shown = generate(*CONTROLS, "an image")
    assert len(images) == 1 and shown is depth
    with pytest.raises(gr.Error, match="upload an image first"):
        generate(*CONTROLS, None)
    with pytest.raises(UserError):
        webui.require_image(None)
