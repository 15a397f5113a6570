"""Hint preprocessors that need no downloaded network: canny, scribble, threshold, a given hint, MiDaS depth
from its weights; problems with the image are one-line errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from cldm.preprocess import hint_tensor, open_hint_image, preprocess
from ldm.errors import UserError


def square(size=64, lo=16, hi=48, inside=(220, 40, 40), outside=(30, 30, 30)):
    pixels = np.full((size, size, 3), outside, dtype=np.uint8)
    pixels[lo:hi, lo:hi] = inside
    return Image.fromarray(pixels)


def one_line_error(call, match):
    with pytest.raises(UserError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_canny_finds_the_edges_of_a_square():
    hint = np.asarray(preprocess(square(), "canny", (64, 64)))
    assert hint.shape == (64, 64, 3) and set(np.unique(hint)) == {0, 255}
    assert (hint[..., 0] == hint[..., 1]).all() and (hint[..., 0] == hint[..., 2]).all()
    edges = np.argwhere(hint[..., 0] == 255)
    # every edge pixel lies on the square's border (within a pixel), and each of its four sides has edges
    distance = np.minimum(np.abs(edges - 15.5), np.abs(edges - 47.5)).min(axis=1)
    assert distance.max() <= 1
    edge = hint[..., 0] == 255
    for side in (edge[15:17, 20:44], edge[47:49, 20:44], edge[20:44, 15:17], edge[20:44, 47:49]):
        assert side.any(axis=0 if side.shape[0] == 2 else 1).all()
    assert not edge[20:44, 20:44].any() and not edge[:10].any()


def test_canny_runs_at_the_hint_size_and_its_thresholds_matter():
    assert preprocess(square(), "canny", (32, 24)).size == (32, 24)
    faint = square(inside=(60, 60, 60))
    assert np.asarray(preprocess(faint, "canny", (64, 64), low=10, high=20)).any()
    one_line_error(lambda: preprocess(faint, "canny", (64, 64), low=250, high=255), "blank.*lower the canny thresholds")
    one_line_error(lambda: preprocess(faint, "canny", (64, 64), low=200, high=100), "low <= high")


def test_threshold_and_scribble_binarise():
    image = square(inside=(200, 200, 200), outside=(40, 40, 40))
    bright = np.asarray(preprocess(image, "threshold", (64, 64)))[..., 0]
    assert bright[16:48, 16:48].min() == 255 and bright[:16].max() == 0
    strokes = np.asarray(preprocess(image, "scribble", (64, 64)))[..., 0]
    assert np.array_equal(strokes, 255 - bright)   # dark strokes on light become white on black
    one_line_error(lambda: preprocess(image, "threshold", (64, 64), threshold=250), "blank")
    one_line_error(lambda: preprocess(image, "scribble", (64, 64), threshold=300), "from 0 to 255")


def test_a_given_hint_is_resized_and_16_bit_maps_stretched():
    ramp = np.tile(np.linspace(0, 4000, 40).astype(np.uint16), (20, 1))
    hint = preprocess(Image.fromarray(ramp), "none", (80, 40))
    array = np.asarray(hint)
    assert hint.mode == "RGB" and hint.size == (80, 40)
    assert array.min() == 0 and array.max() == 255


def test_problems_with_the_hint_image_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    one_line_error(lambda: open_hint_image(empty), "is empty")
    (tmp_path / "text.png").write_text("not an image")
    one_line_error(lambda: open_hint_image(tmp_path / "text.png"), "cannot be read")
    one_line_error(lambda: open_hint_image(tmp_path / "missing.png"), "does not exist")
    one_line_error(lambda: preprocess(Image.new("RGB", (8, 8), "white"), "none", (8, 8)), "blank")
    see_through = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    see_through.putpixel((2, 2), (0, 0, 0, 255))
    one_line_error(lambda: preprocess(see_through, "canny", (8, 8)), "transparent pixels")
    opaque = square().convert("RGBA")
    assert preprocess(opaque, "none", (64, 64)).mode == "RGB"
    one_line_error(lambda: preprocess(square(), "hed", (8, 8)), "unknown preprocessor 'hed'")


def test_depth_needs_midas_weights_and_makes_near_white():
    from tiny_models import TINY_DPT

    from ldm.modules.midas.api import MiDaSInference
    image = square()
    one_line_error(lambda: preprocess(image, "depth", (64, 64)), "needs MiDaS weights")
    torch.manual_seed(0)
    midas = MiDaSInference("dpt_hybrid", **TINY_DPT)
    one_line_error(lambda: preprocess(image, "depth", (64, 64), midas=midas), "needs MiDaS weights")
    with torch.no_grad():
        midas.model.scratch.output_conv[4].bias += 1.0   # keep the random depth above the final ReLU
    midas.has_weights = True
    hint = np.asarray(preprocess(image, "depth", (48, 32), midas=midas))
    assert hint.shape == (32, 48, 3) and hint.min() == 0 and hint.max() == 255


def test_load_midas_reads_a_release_file(tmp_path):
    from cldm.preprocess import load_midas
    from ldm.modules.midas.api import MiDaSInference
    path = tmp_path / "midas_v21_small-70d6b9c8.pt"
    torch.save(MiDaSInference("midas_v21_small").model.state_dict(), path)
    assert load_midas(path, "midas_v21_small").has_weights
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "other.pt")
    one_line_error(lambda: load_midas(tmp_path / "other.pt", "midas_v21_small"), "do not fit")


def test_hint_tensor_channels_and_range():
    grey = Image.new("L", (8, 4), 128)
    assert hint_tensor(grey, 3).shape == (1, 3, 4, 8)
    assert hint_tensor(square(), 1).shape == (1, 1, 64, 64)
    assert torch.allclose(hint_tensor(grey, 1), torch.full((1, 1, 4, 8), 128 / 255))
    one_line_error(lambda: hint_tensor(torch.rand(2, 3, 8, 8), 3), r"\[C, H, W\] or \[1, C, H, W\]")
    one_line_error(lambda: hint_tensor(torch.rand(1, 8, 8), 3), "1 channels but this ControlNet reads 3")
    one_line_error(lambda: hint_tensor(square(), 4), "4-channel hints")


def test_resize_modes_fit_an_image_of_another_shape_as_sd_webui_controlnet_does():
    wide = np.zeros((64, 128, 3), dtype=np.uint8)
    wide[24:40, 8:24] = 255      # a square near the left edge...
    wide[24:40, 56:72] = 255     # ...and one in the middle
    image = Image.fromarray(wide)
    cropped = np.asarray(preprocess(image, "none", (64, 64)))[..., 0]    # crop-and-resize, the default
    assert np.array_equal(cropped, wide[:, 32:96, 0])                    # the middle, at scale 1: left square cut off
    filled = np.asarray(preprocess(image, "none", (64, 64), resize_mode="resize-and-fill"))[..., 0]
    assert not filled[:16].any() and not filled[48:].any()              # black bands above and below
    assert filled[29:35, 5:11].mean() > 200 and filled[29:35, 29:35].mean() > 200   # both squares, half size
    stretched = np.asarray(preprocess(image, "none", (64, 64), resize_mode="just-resize"))[..., 0] > 127
    rows, cols = np.nonzero(stretched[:, 24:40])
    assert np.ptp(rows) + 1 == 16 and np.ptp(cols) + 1 <= 10                 # the middle square, squeezed to half its width
    one_line_error(lambda: preprocess(image, "none", (64, 64), resize_mode="fit"), "unknown resize mode")
