import pytest
from PIL import Image

from ldm.image_io import read_parameters
from tiny_models import save_model_files, upscale_config


@pytest.fixture(scope="module")
def upscale_files(tmp_path_factory):
    """A tiny upscaler (the tiny VAE makes it x2; max noise level 350, as officially) and its config."""
    return save_model_files(upscale_config(), tmp_path_factory.mktemp("tiny_upscale"), "upscale")


@pytest.fixture
def low_res(random_png):
    return random_png("low.png", 14, 10)


def test_upscale_subprocess_tiles_and_writes_samples(scripts, upscale_files, tmp_path, low_res):
    out = tmp_path / "out"
    result = scripts.run("upscale", [*scripts.model_flags(upscale_files), "--init-img", str(low_res), "--steps", "2",
                                     "--tile", "8", "--tile-overlap", "4", "--noise_level", "50", "--verbose",
                                     "--n_samples", "2", "--outdir", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "in 6 tiles of 8x8 low-res pixels" in result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    with Image.open(out / "samples" / "00001.png") as image:
        assert image.size == (28, 20)
    params = read_parameters(out / "samples" / "00000.png")
    assert params["prompt"] == "" and params["size"] == "28x20" and params["scale"] == "9.0"
    assert params["noise_level"] == "50"


@pytest.mark.parametrize("flags, message", [
    (["--noise_level", "351"], "noise level 351 is out of range for this model; use a whole number from 0 to 350"),
    (["--noise_level", "-1"], "--noise_level must be 0 or more"),
    (["--tile", "-4"], "--tile must be 0"),
    (["--tile", "3"], "tile must be 0 (no tiling) or a positive multiple of 2"),
    (["--tile", "8", "--tile-overlap", "8"], "--tile-overlap must be from 0 to 7"),
    (["--init-img", "missing.png"], "init image 'missing.png' does not exist"),
])
def test_impossible_flags(scripts, upscale_files, tmp_path, capsys, low_res, flags, message):
    upscale = scripts.load("upscale")
    assert upscale.main([*scripts.model_flags(upscale_files), "--init-img", str(low_res), "--steps", "2",
                         "--outdir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not any((tmp_path / "out").rglob("*.png"))


def test_missing_init_image_flag_and_wrong_family(scripts, tiny_files, tmp_path, capsys, low_res):
    upscale = scripts.load("upscale")
    assert upscale.main([*scripts.model_flags(tiny_files), "--outdir", str(tmp_path / "out")]) == 2
    assert "required: --init-img" in capsys.readouterr().err
    assert upscale.main([*scripts.model_flags(tiny_files), "--init-img", str(low_res),
                         "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "needs an x4 upscaling model" in err[0]
