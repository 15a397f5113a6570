"""The model shipped in models/shapes/ loads strictly and draws what it is asked for."""
import numpy as np
import pytest

from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT, load_model, read_state_dict
from ldm.cli import SHIPPED_DEFAULTS
from ldm.data.shapes import describe


@pytest.fixture(scope="module")
def shipped():
    return load_model()  # no paths: the shipped default


def test_checkpoint_is_small_and_complete(shipped):
    path = REPO_ROOT / DEFAULT_CKPT
    assert path.stat().st_size < 32 * 2 ** 20
    sd = read_state_dict(path)
    assert set(sd) == set(shipped.state_dict())  # strict: nothing missing, nothing extra
    assert float(shipped.scale_factor) > 0.1  # measured from the data (scale_by_std)


@pytest.mark.parametrize("prompt,colour,shape", [("a red square", "red", "square"),
                                                 ("a blue circle on a white background", "blue", "circle")])
def test_ten_step_sample_reads_back(shipped, prompt, colour, shape):
    from ldm.generate import txt2img
    images = txt2img(shipped, prompt, steps=10, scale=SHIPPED_DEFAULTS["scale"], seed=1, n_samples=2,
                     progress=False)
    seen = [describe(image) for image in images]
    assert images[0].size == (64, 64)
    assert any(s["colour"] == colour and s["shape"] == shape for s in seen), seen


def test_guidance_changes_the_image(shipped):
    from ldm.generate import txt2img
    a = txt2img(shipped, "a green triangle", steps=5, scale=1.0, seed=3, progress=False)[0]
    b = txt2img(shipped, "a green triangle", steps=5, scale=5.0, seed=3, progress=False)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
