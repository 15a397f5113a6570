import numpy as np
import pytest
from PIL import Image

from ldm.image_io import read_parameters


@pytest.fixture
def init_png(random_png):
    return random_png("init.png", 70, 64)


def test_img2img_subprocess_writes_samples_and_grid(scripts, tiny_files, tmp_path, init_png):
    out = tmp_path / "out"
    result = scripts.run("img2img", [*scripts.model_flags(tiny_files), "--init-img", str(init_png),
                                     "--prompt", "a red circle", "--strength", "0.5",
                                     "--steps", "4", "--n_samples", "2", "--outdir", str(out)],
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resized from 70x64 to 64x64" in result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    assert str(out) in result.stdout
    with Image.open(out / "samples" / "00001.png") as image:
        assert image.size == (64, 64)
    params = read_parameters(out / "samples" / "00001.png")
    assert params["prompt"] == "a red circle" and params["size"] == "64x64"
    assert params["strength"] == "0.5" and "eta" not in params  # eta 0 is the default, left out


def test_img2img_subprocess_bad_strength_is_one_line(scripts, tiny_files, tmp_path, init_png):
    result = scripts.run("img2img", [*scripts.model_flags(tiny_files), "--init-img", str(init_png),
                                     "--strength", "1.5", "--outdir", str(tmp_path / "out")],
                         cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: --strength must be from 0.0 to 1.0, got 1.5"]
    assert not (tmp_path / "out").exists()


def test_img2img_in_process_numbering_continues(scripts, tiny_files, tmp_path, init_png):
    img2img = scripts.load("img2img")
    args = [*scripts.model_flags(tiny_files), "--init-img", str(init_png), "--steps", "2",
            "--n_samples", "1", "--outdir", str(tmp_path / "out"), "--skip_grid"]
    assert img2img.main(args) == 0
    assert img2img.main(args) == 0
    first, second = (np.asarray(Image.open(tmp_path / "out" / "samples" / f"{i:05}.png"))
                     for i in range(2))
    assert np.array_equal(first, second)    # same seed, same image, new file


@pytest.mark.parametrize("flags, message", [
    (["--init-img", "missing.png"], "init image 'missing.png' does not exist"),
    ([], "the following arguments are required: --init-img"),
    (["--init-img", "{init}", "--strength", "-0.5"], "--strength must be from 0.0 to 1.0"),
    (["--init-img", "{init}", "--n_iter", "0"], "--n_iter must be at least 1"),
    (["--init-img", "{bad}"], "cannot be read"),
])
def test_impossible_flags(scripts, tiny_files, tmp_path, capsys, init_png, flags, message):
    img2img = scripts.load("img2img")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    flags = [f.format(init=init_png, bad=tmp_path / "bad.png") for f in flags]
    assert img2img.main([*scripts.model_flags(tiny_files), "--outdir", str(tmp_path / "out"),
                         *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
