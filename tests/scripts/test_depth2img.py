import numpy as np
import pytest
import torch
from PIL import Image

from ldm.image_io import read_parameters
from tiny_models import build_tiny_model, depth_config, save_model_files


@pytest.fixture(scope="module")
def depth_files(tmp_path_factory):
    """A tiny depth checkpoint with (random) MiDaS weights, one without them (``no_midas``), and the config."""
    folder = tmp_path_factory.mktemp("tiny_depth")
    config = depth_config()
    sd = build_tiny_model(config).state_dict()
    sd["depth_model.model.scratch.output_conv.4.bias"] += 1.0   # keep the random depth above the final ReLU
    files = save_model_files(config, folder, "depth", sd)
    files.no_midas = folder / "no-midas.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("depth_model.")}}, files.no_midas)
    return files


@pytest.fixture
def init_png(random_png):
    return random_png("init.png", 20, 16)


def test_depth2img_with_midas_writes_the_depth_beside_each_sample(scripts, depth_files, tmp_path, init_png):
    out = tmp_path / "out"
    result = scripts.run("depth2img", [*scripts.model_flags(depth_files), "--init-img", str(init_png),
                                       "--prompt", "a room", "--steps", "2", "--strength", "0.5", "--n_samples", "2",
                                       "--outdir", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["00000-depth.png", "00000.png", "00001-depth.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00001.png")
    assert params["prompt"] == "a room" and params["size"] == "20x16" and params["scale"] == "9.0"
    with Image.open(out / "samples" / "00000-depth.png") as depth:
        assert depth.size == (20, 16) and depth.mode == "L"
        assert np.asarray(depth).min() == 0 and np.asarray(depth).max() == 255


def test_given_depth_map_is_the_one_written(scripts, depth_files, tmp_path, init_png):
    depth2img = scripts.load("depth2img")
    ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (32, 1))     # twice the image size
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    out = tmp_path / "out"
    assert depth2img.main([*scripts.model_flags(depth_files), "--init-img", str(init_png), "--depth-map",
                           str(tmp_path / "depth.png"), "--steps", "2", "--n_samples", "1", "--skip_grid",
                           "--outdir", str(out)]) == 0
    written = np.asarray(Image.open(out / "samples" / "00000-depth.png"), dtype=int)
    expected = np.asarray(Image.fromarray(ramp).resize((20, 16), Image.BILINEAR), dtype=float)
    expected = 255 * (expected - expected.min()) / (expected.max() - expected.min())
    assert np.abs(written - expected).max() <= 1


@pytest.mark.parametrize("flags, message", [
    ([], "the following arguments are required: --init-img"),
    (["--init-img", "missing.png"], "init image 'missing.png' does not exist"),
    (["--init-img", "{init}", "--strength", "1.5"], "--strength must be from 0.0 to 1.0"),
    (["--init-img", "{init}", "--depth-map", "none.png"], "depth map 'none.png' does not exist"),
])
def test_impossible_flags(scripts, depth_files, tmp_path, capsys, init_png, flags, message):
    depth2img = scripts.load("depth2img")
    flags = [f.format(init=init_png) for f in flags]
    assert depth2img.main([*scripts.model_flags(depth_files), "--outdir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_missing_depth_weights_and_wrong_family_are_one_line(scripts, depth_files, tiny_files, tmp_path, capsys,
                                                             init_png):
    depth2img = scripts.load("depth2img")
    common = ["--init-img", str(init_png), "--steps", "2", "--outdir", str(tmp_path / "out")]
    assert depth2img.main(["--ckpt", str(depth_files.no_midas), "--config", str(depth_files.config),
                           "--device", "cpu", *common]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]
    assert "no weights for depth_model.*" in err[0] and "--config" not in err[0]  # not the config it tried
    assert depth2img.main([*scripts.model_flags(tiny_files), *common]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "needs a depth-to-image model" in err[0]
    assert not any((tmp_path / "out").rglob("*.png"))
