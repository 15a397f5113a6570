import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.image_io import (GRID_PATTERN, format_parameters, images_to_tensor, load_image,
                          make_grid, next_index, parse_parameters, put_watermark,
                          make_watermarker, read_parameters, save_grid, save_samples,
                          tensor_to_images)

PARAMS = dict(prompt="a red circle, on blue\nsecond line", negative_prompt="blurry, dark",
              steps=20, sampler="ddim", scale=7.5, seed=1234, size="16x16",
              model_hash="0123456789")


def noise_image(size=16, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))


def test_next_index_counts_on_from_the_highest_number(tmp_path):
    assert next_index(tmp_path / "absent") == 0
    assert next_index(tmp_path) == 0
    for name in ("00000.png", "00007.png", "notes.txt", "123.png", "grid-0009.png"):
        (tmp_path / name).write_bytes(b"")
    assert next_index(tmp_path) == 8
    assert next_index(tmp_path, GRID_PATTERN) == 10


def test_save_samples_never_overwrites(tmp_path):
    (tmp_path / "00003.png").write_bytes(b"keep me")
    first = save_samples([noise_image(), noise_image(seed=1)], tmp_path, PARAMS,
                         no_watermark=True)
    second = save_samples([noise_image(seed=2)], tmp_path, PARAMS, no_watermark=True)
    assert [p.name for p in first + second] == ["00004.png", "00005.png", "00006.png"]
    assert (tmp_path / "00003.png").read_bytes() == b"keep me"


def test_save_grid_numbering_and_layout(tmp_path):
    images = [noise_image(seed=i) for i in range(5)]
    paths = [save_grid(images, tmp_path, n_rows=2, parameters=PARAMS, no_watermark=True)
             for _ in range(2)]
    assert [p.name for p in paths] == ["grid-0000.png", "grid-0001.png"]
    with Image.open(paths[0]) as grid:
        # 2 images per row, 3 rows, 2-pixel borders
        assert grid.size == (2 * 18 + 2, 3 * 18 + 2)
        assert np.array_equal(np.asarray(grid)[2:18, 20:36], np.asarray(images[1]))


def test_parameters_round_trip_through_png(tmp_path):
    (path,) = save_samples([noise_image()], tmp_path, PARAMS, no_watermark=True)
    back = read_parameters(path)
    assert back == {k: str(v) for k, v in PARAMS.items()}


def test_parameters_without_negative_prompt():
    text = format_parameters(dict(prompt="a cat", steps=5, seed=3))
    assert "Negative prompt" not in text
    assert parse_parameters(text) == {"prompt": "a cat", "negative_prompt": "",
                                      "steps": "5", "seed": "3"}


def test_pixels_are_saved_unchanged_without_watermark(tmp_path):
    image = noise_image()
    (path,) = save_samples([image], tmp_path, PARAMS, no_watermark=True)
    with Image.open(path) as back:
        assert np.array_equal(np.asarray(back), np.asarray(image))


def test_watermark_is_embedded_and_readable(tmp_path):
    from imwatermark import WatermarkDecoder
    (path,) = save_samples([noise_image(256)], tmp_path, PARAMS)
    with Image.open(path) as back:
        bgr = np.asarray(back)[:, :, ::-1].copy()
    assert WatermarkDecoder("bytes", 32).decode(bgr, "dwtDct") == b"SDV2"


def test_small_images_are_saved_without_watermark():
    image = noise_image(16)
    assert put_watermark(image, make_watermarker()) is image


def test_tensor_image_conversions():
    x = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    images = tensor_to_images(x)
    assert len(images) == 2 and images[0].size == (2, 2)
    assert np.asarray(images[0])[:, :, 0].tolist() == [[0, 127], [255, 255]]
    back = images_to_tensor(images)
    assert back.shape == (2, 3, 2, 2) and back.min() == -1.0 and back.max() == 1.0


def test_make_grid_needs_images():
    with pytest.raises(ValueError):
        make_grid([], 2)


def test_load_image_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot be read"):
        load_image(tmp_path / "bad.png")
    noise_image().convert("L").save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"


def test_companion_files_keep_their_number_taken(tmp_path):
    from ldm.image_io import save_companion, save_samples
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    first = save_samples([red], tmp_path, no_watermark=True)[0]
    save_companion(blue, first, "depth")
    first.unlink()  # the sample is deleted, its depth map stays behind
    again = save_samples([red], tmp_path, no_watermark=True)[0]
    assert again.name == "00001.png"  # a new number, not 00000 again
    with Image.open(tmp_path / "00000-depth.png") as stale:
        assert stale.getpixel((0, 0)) == (0, 0, 255)


def test_save_companion_never_overwrites(tmp_path):
    from ldm.image_io import save_companion
    sample = tmp_path / "00007.png"
    (tmp_path / "00007-depth.png").write_bytes(b"earlier")
    path = save_companion(Image.new("L", (4, 4), 9), sample, "depth")
    assert path.name == "00007-depth-1.png"
    assert (tmp_path / "00007-depth.png").read_bytes() == b"earlier"


def test_unwritable_folder_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create the output folder"):
        save_samples([Image.new("RGB", (8, 8))], tmp_path / "file" / "sub", no_watermark=True)


def test_controlnet_units_round_trip_as_sd_webui_controlnet_writes_them():
    units = ["Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Guidance End: 0.5",
             'Module: none, Model: my "odd" name [e3b0c442], Weight: 0.6']
    text = format_parameters(dict(prompt="a cat", steps=5, controlnet=units))
    assert text.endswith('Steps: 5, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], '
                         'Weight: 1, Guidance End: 0.5", ControlNet 1: "Module: none, Model: my \\"odd\\" name '
                         '[e3b0c442], Weight: 0.6"')
    assert parse_parameters(text) == {"prompt": "a cat", "negative_prompt": "", "steps": "5", "controlnet": units}
