import numpy as np
import pytest
from PIL import Image

from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT, file_hash
from ldm.cli import SHIPPED_DEFAULTS
from ldm.image_io import read_parameters
from tiny_models import inpaint_config, save_model_files


@pytest.fixture(scope="module")
def inpaint_files(tmp_path_factory):
    """A tiny 9-channel inpainting checkpoint and its config."""
    return save_model_files(inpaint_config(), tmp_path_factory.mktemp("tiny_inpaint"), "inpaint")


@pytest.fixture
def inputs(tmp_path, random_png):
    """A 20x12 image and a twice-as-large RGBA mask (transparent = keep) over x 4..12, y 2..8."""
    image = np.asarray(Image.open(random_png("init.png", 20, 12)))
    mask = np.full((24, 40, 4), 255, dtype=np.uint8)
    mask[..., 3] = 0
    mask[4:16, 8:24, 3] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png", image


def test_blend_inpainting_with_a_txt2img_model(scripts, tiny_files, tmp_path, inputs):
    init, mask, image = inputs
    out = tmp_path / "out"
    result = scripts.run("inpaint", [*scripts.model_flags(tiny_files), "--init-img", str(init), "--mask", str(mask),
                                     "--prompt", "a red circle", "--steps", "2", "--n_samples", "2",
                                     "--outdir", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mask is 40x24 but the image is 20x12; resizing" in result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00001.png")
    assert params["prompt"] == "a red circle" and params["size"] == "20x12" and params["steps"] == "2"
    assert params["model_hash"] == file_hash(tiny_files.ckpt)
    got = np.asarray(Image.open(out / "samples" / "00000.png"))
    keep = np.ones(image.shape[:2], dtype=bool)
    keep[2:8, 4:12] = False
    assert np.array_equal(got[keep], image[keep])     # too small to watermark: pixels are exact


def test_inpainting_model_and_outpaint(scripts, inpaint_files, tmp_path, inputs, capsys, caplog):
    inpaint = scripts.load("inpaint")
    init, mask, _ = inputs
    out = tmp_path / "out"
    assert inpaint.main([*scripts.model_flags(inpaint_files), "--init-img", str(init), "--outpaint", "0,5,8,0",
                         "--steps", "2", "--n_samples", "1", "--dpm", "--outdir", str(out)]) == 0
    assert "rounded up to multiples of 8: 0,8,8,0" in caplog.text
    with Image.open(out / "samples" / "00000.png") as result:
        assert result.size == (28, 20)
    assert read_parameters(out / "samples" / "00000.png")["sampler"] == "DPM-Solver++"


@pytest.mark.parametrize("flags, message", [
    ([], "the following arguments are required: --init-img"),
    (["--init-img", "missing.png", "--mask", "{mask}"], "init image 'missing.png' does not exist"),
    (["--init-img", "{init}"], "pass --mask (white = repaint) or --outpaint"),
    (["--init-img", "{init}", "--mask", "nope.png"], "mask 'nope.png' does not exist"),
    (["--init-img", "{init}", "--outpaint", "1,2,3"], "--outpaint takes four whole numbers"),
    (["--init-img", "{init}", "--outpaint", "0,0,-8,0"], "--outpaint takes four whole numbers"),
    (["--init-img", "{init}", "--mask", "{bad}"], "cannot be read"),
])
def test_impossible_flags(scripts, tiny_files, tmp_path, capsys, inputs, flags, message):
    inpaint = scripts.load("inpaint")
    init, mask, _ = inputs
    (tmp_path / "bad.png").write_bytes(b"not a png")
    flags = [f.format(init=init, mask=mask, bad=tmp_path / "bad.png") for f in flags]
    assert inpaint.main([*scripts.model_flags(tiny_files), "--steps", "2", "--outdir", str(tmp_path / "out"),
                         *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not any((tmp_path / "out").rglob("*.png"))


SHIPPED = REPO_ROOT / DEFAULT_CKPT


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model is not in models/shapes/ yet")
def test_shipped_model_is_the_default(scripts, tmp_path):
    inpaint = scripts.load("inpaint")
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    image[8:24, 8:24] = (220, 30, 30)
    Image.fromarray(image).save(tmp_path / "init.png")
    Image.fromarray(np.pad(np.full((32, 32), 255, dtype=np.uint8), ((24, 8), (24, 8)))).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert inpaint.main(["--init-img", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "5",
                         "--n_samples", "1", "--device", "cpu", "--outdir", str(out)]) == 0
    params = read_parameters(out / "samples" / "00000.png")
    assert params["model_hash"] == file_hash(SHIPPED) and params["scale"] == str(SHIPPED_DEFAULTS["scale"])
    got = np.asarray(Image.open(out / "samples" / "00000.png"))
    assert np.array_equal(got[:24], image[:24]) and np.array_equal(got[:, :24], image[:, :24])
