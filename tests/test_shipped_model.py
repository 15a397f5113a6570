"""The model shipped in models/shapes/ loads strictly and draws what it is asked for."""
import numpy as np
import pytest

from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT, load_model, read_state_dict
from ldm.cli import SHIPPED_DEFAULTS, shipped_sampling
from ldm.data.shapes import describe, describe_pair, parse_pair_prompt, parse_prompt


@pytest.fixture(scope="module")
def shipped():
    return load_model()  # no paths: the shipped default


def _sample(model, prompt, n=2, seed=1):
    from ldm.generate import txt2img
    return txt2img(model, prompt, seed=seed, n_samples=n, progress=False, **shipped_sampling())


def test_checkpoint_is_small_and_complete(shipped):
    path = REPO_ROOT / DEFAULT_CKPT
    assert path.stat().st_size < 40 * 2 ** 20
    sd = read_state_dict(path)
    assert set(sd) == set(shipped.state_dict())  # strict: nothing missing, nothing extra
    assert float(shipped.scale_factor) > 0.1  # measured from the data (scale_by_std)


@pytest.mark.parametrize("prompt", [SHIPPED_DEFAULTS["prompt"],
                                    "a large blue square on the left on a black background",
                                    "a small yellow triangle at the top on a gray background"])
def test_samples_read_back_every_named_attribute(shipped, prompt):
    images = _sample(shipped, prompt)
    wanted = parse_prompt(prompt)
    seen = [describe(image) for image in images]
    assert images[0].size == (64, 64)
    assert any(all(s[k] == v for k, v in wanted.items()) for s in seen), (wanted, seen)


def test_two_shape_scene_reads_back_with_binding(shipped):
    prompt = "a red circle on the left and a blue square on the right on a white background"
    wanted = parse_pair_prompt(prompt)
    seen = [describe_pair(image) for image in _sample(shipped, prompt, n=3)]
    expected = {o["position"]: {"colour": o["colour"], "shape": o["shape"]} for o in wanted["objects"]}
    assert any(s["left"] == expected["left"] and s["right"] == expected["right"] and s["background"] == "white"
               for s in seen), seen


def test_guidance_changes_the_image(shipped):
    from ldm.generate import txt2img
    a = txt2img(shipped, "a green triangle", steps=5, scale=1.0, seed=3, progress=False)[0]
    b = txt2img(shipped, "a green triangle", steps=5, scale=5.0, seed=3, progress=False)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
