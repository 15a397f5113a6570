"""The captioned image folder (kohya / A1111 layout): what it reads, how it crops, what it refuses."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.captioned_folder import (
    CaptionedImageFolder,
    is_written,
    square_crop,
    write_dataset_items,
)
from ldm.data.shapes_concepts import ShapesConcept
from ldm.errors import UserError


def save(folder, name, colour=(255, 0, 0), size=(20, 20), caption=None):
    Image.new("RGB", size, colour).save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def test_items_are_images_in_minus_one_to_one_with_their_captions(tmp_path):
    save(tmp_path, "b.png", (255, 255, 255), caption="a white square")
    save(tmp_path, "a.jpg", (0, 0, 0), size=(40, 24), caption="  a black one  ")
    (tmp_path / "notes.md").write_text("not an image")
    data = CaptionedImageFolder(tmp_path, size=16)
    assert len(data) == 2
    first, second = data[0], data[1]   # sorted by file name
    assert first["caption"] == "a black one" and second["caption"] == "a white square"
    for item in (first, second):
        assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.float32
    assert np.allclose(first["image"], -1.0) and np.allclose(second["image"], 1.0)
    assert data[-1]["caption"] == "a white square"
    with pytest.raises(IndexError):
        data[2]


def test_one_caption_for_images_without_a_caption_file(tmp_path):
    save(tmp_path, "0.png")
    save(tmp_path, "1.png", caption="its own caption")
    data = CaptionedImageFolder(tmp_path, size=8, caption="a photo of sks")
    assert [data[i]["caption"] for i in range(2)] == ["a photo of sks", "its own caption"]


def test_repeats_list_every_image_again(tmp_path):
    save(tmp_path, "0.png", caption="x")
    save(tmp_path, "1.png", caption="y")
    data = CaptionedImageFolder(tmp_path, size=8, repeats=3)
    assert len(data) == 6 and [data[i]["caption"] for i in range(6)] == ["x", "y"] * 3


def test_shorter_side_is_resized_and_the_centre_is_cut():
    # 40x20: red, green, blue bands of 10, 20, 10 columns; at 10x10 only the green middle stays
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:30, 1] = pixels[:, 30:, 2] = 255
    crop = np.asarray(square_crop(Image.fromarray(pixels), 10)).astype(int)
    assert crop.shape == (10, 10, 3)
    assert (crop[:, 2:8, 1] == 255).all() and (crop[:, 2:8, [0, 2]] == 0).all()
    assert square_crop(Image.new("RGB", (5, 9)), 12).size == (12, 12)   # small images are enlarged


def test_written_items_read_back(tmp_path):
    concept = ShapesConcept("instance", length=3, size=16)
    paths = write_dataset_items(concept, tmp_path / "instance")
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    assert all(is_written(tmp_path / "instance", f"{i:05}") for i in range(3))
    data = CaptionedImageFolder(tmp_path / "instance", size=16)
    for i in range(3):
        assert data[i]["caption"] == concept[i]["caption"]
        assert np.abs(data[i]["image"] - concept[i]["image"]).max() <= 1 / 127.5 + 1e-6   # uint8 rounding


@pytest.mark.parametrize("setup,message", [
    (lambda folder: None, "has no images"),
    (lambda folder: (folder / "broken.png").write_bytes(b"not a png"), "cannot be read"),
    (lambda folder: save(folder, "0.png"), "has no caption file '0.txt'"),
])
def test_bad_folders_are_user_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        CaptionedImageFolder(tmp_path, size=8)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        CaptionedImageFolder(tmp_path / "nowhere")
