"""The ControlNet shipped beside the shapes model (models/shapes/shapes-controlnet.safetensors) loads
strictly onto it, puts the shape in the hinted region, and leaves the base images alone at strength 0;
scripts/controlnet.py uses it when no model is named."""
import numpy as np
import pytest
import torch

from cldm.loading import DEFAULT_CONTROL, load_controlnet_model, read_control_file
from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT, load_model
from ldm.cli import shipped_sampling
from ldm.data.shapes import describe
from ldm.data.shapes_control import region_box, region_hint, region_mask
from ldm.data.shapes_describe import drawn_pixels


@pytest.fixture(scope="module")
def controlled():
    return load_controlnet_model(REPO_ROOT / DEFAULT_CKPT, REPO_ROOT / DEFAULT_CONTROL, device="cpu")


def sample(model, prompt, hint, weight=1.0, seed=1, n=2):
    from cldm.generate import ControlUnit, controlnet_txt2img
    return controlnet_txt2img(model, prompt, [ControlUnit(hint, weight=weight)], seed=seed, n_samples=n,
                              progress=False, **shipped_sampling())


def box_hint(box):
    return torch.from_numpy(region_hint(box, 128)).permute(2, 0, 1)


def test_the_file_is_small_and_control_only(controlled):
    path = REPO_ROOT / DEFAULT_CONTROL
    assert path.stat().st_size < 10 * 2 ** 20
    assert set(read_control_file(path)) == set(controlled.control_model.state_dict())


@pytest.mark.parametrize("prompt, box, position", [
    ("a small red square on a white background", region_box("square", 0.27, 0.5, 0.22), "left"),
    ("a large blue circle on a black background", region_box("circle", 0.5, 0.72, 0.42), "bottom"),
])
def test_the_shape_lands_in_the_hinted_region(controlled, prompt, box, position):
    images = sample(controlled, prompt, box_hint(box))
    x0, y0, x1, y1 = box
    region = region_mask((x0 - 1 / 64, y0 - 1 / 64, x1 + 1 / 64, y1 + 1 / 64), 64)
    hits = 0
    for image in images:
        drawn, seen = drawn_pixels(image), describe(image)
        inside = (drawn & region).sum() >= 0.9 * drawn.sum() > 0
        hits += inside and seen["position"] == position and seen["colour"] in prompt and seen["shape"] in prompt
    assert hits >= 1, [describe(image) for image in images]


def test_strength_zero_is_the_shipped_model_exactly(controlled):
    from ldm.generate import txt2img
    prompt = "a green triangle on a gray background"
    off = sample(controlled, prompt, box_hint(region_box("triangle", 0.7, 0.5, 0.4)), weight=0.0, n=1)
    plain = txt2img(load_model(), prompt, seed=1, n_samples=1, progress=False, **shipped_sampling())
    assert np.array_equal(np.asarray(off[0]), np.asarray(plain[0]))


def test_the_script_uses_it_by_default(tmp_path):
    import subprocess
    import sys
    hint = tmp_path / "mask.png"
    from PIL import Image
    Image.fromarray((region_hint(region_box("square", 0.73, 0.5, 0.4), 64) * 255).astype(np.uint8)).save(hint)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "controlnet.py"), "--hint", str(hint),
                           "--prompt", "a large yellow square on a black background", "--n_samples", "2",
                           "--skip_grid", "--outdir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = [describe(Image.open(p)) for p in sorted((out / "samples").glob("0000?.png"))]
    assert len(seen) == 2 and any(s["position"] == "right" and s["colour"] == "yellow" for s in seen), seen
