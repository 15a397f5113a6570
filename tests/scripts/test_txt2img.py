import numpy as np
import pytest
from PIL import Image

from ldm.checkpoint import file_hash
from ldm.image_io import read_parameters


def test_txt2img_subprocess_writes_samples_and_grid(scripts, tiny_files, tmp_path):
    out = tmp_path / "out"
    result = scripts.run("txt2img", [*scripts.model_flags(tiny_files), "--prompt", "a red circle",
                                     "--steps", "4", "--n_samples", "2", "--seed", "5",
                                     "--outdir", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    assert str(out) in result.stdout
    params = read_parameters(out / "samples" / "00000.png")
    assert params["prompt"] == "a red circle"
    assert params["seed"] == "5" and params["steps"] == "4" and params["sampler"] == "DDIM"
    assert params["size"] == "16x16" and params["model_hash"] == file_hash(tiny_files.ckpt)
    with Image.open(out / "samples" / "00000.png") as image:
        assert image.size == (16, 16)


def test_txt2img_subprocess_bad_input_is_one_line(scripts, tiny_files, tmp_path):
    result = scripts.run("txt2img", [*scripts.model_flags(tiny_files), "--H", "17",
                                     "--outdir", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: --H must be a positive multiple of 8, got 17"]
    assert not (tmp_path / "out").exists()


def test_numbering_continues_and_from_file_prompts(scripts, tiny_files, tmp_path, capsys):
    txt2img = scripts.load("txt2img")
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    common = [*scripts.model_flags(tiny_files), "--steps", "2", "--outdir", str(out), "--n_samples", "2"]
    assert txt2img.main([*common, "--prompt", "first run", "--no-watermark"]) == 0
    assert txt2img.main([*common, "--from-file", str(prompts), "--repeat", "2", "--plms",
                         "--negative-prompt", "blurry"]) == 0
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == [f"{i:05}.png" for i in range(6)]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    got = [read_parameters(out / "samples" / f"{i:05}.png") for i in range(2, 6)]
    assert [p["prompt"] for p in got] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert {p["negative_prompt"] for p in got} == {"blurry"}
    assert {p["sampler"] for p in got} == {"PLMS"}
    with Image.open(out / "grid-0001.png") as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)
    assert "outputs:" in capsys.readouterr().out


def test_same_seed_same_files(scripts, tiny_files, tmp_path):
    txt2img = scripts.load("txt2img")
    for name in ("a", "b"):
        assert txt2img.main([*scripts.model_flags(tiny_files), "--steps", "2", "--n_samples", "1",
                             "--outdir", str(tmp_path / name), "--skip_grid"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "samples" / "00000.png")) for n in "ab")
    assert np.array_equal(a, b)


def test_skip_save_and_skip_grid_write_nothing(scripts, tiny_files, tmp_path, capsys):
    txt2img = scripts.load("txt2img")
    assert txt2img.main([*scripts.model_flags(tiny_files), "--steps", "1", "--skip_save", "--skip_grid",
                         "--outdir", str(tmp_path / "out")]) == 0
    assert not any((tmp_path / "out").rglob("*.png"))
    assert "none saved" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--plms", "--dpm"], "not allowed with argument"),
    (["--n_samples", "0"], "--n_samples must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--W", "30"], "--W must be a positive multiple of 8"),
    (["--plms", "--ddim_eta", "0.5"], "PLMS has no eta"),
    (["--from-file", "missing.txt"], "prompt file 'missing.txt' does not exist"),
    (["--precision", "half"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--C", "8"], "--C 8 does not match the model"),
    (["--f", "8"], "--f 8 does not match the model"),
])
def test_impossible_flags(scripts, tiny_files, tmp_path, capsys, flags, message):
    txt2img = scripts.load("txt2img")
    assert txt2img.main([*scripts.model_flags(tiny_files), "--outdir", str(tmp_path / "out"),
                         *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not any((tmp_path / "out").rglob("*.png"))


def test_config_that_does_not_fit(scripts, tiny, tiny_files, tmp_path, capsys):
    txt2img = scripts.load("txt2img")
    config = tiny.config()
    config["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    other = tiny.write_config(config, tmp_path / "other.yaml")
    assert txt2img.main(["--ckpt", str(tiny_files.ckpt), "--config", str(other),
                         "--device", "cpu", "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "does not fit this checkpoint" in err[0]
    assert "other.yaml" in err[0]


def test_ckpt_without_config(scripts, tiny_files, tmp_path, capsys):
    txt2img = scripts.load("txt2img")
    alone = tmp_path / "alone.ckpt"
    alone.write_bytes(tiny_files.ckpt.read_bytes())
    assert txt2img.main(["--ckpt", str(alone), "--device", "cpu", "--outdir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "needs a config too" in err[0] and "alone.yaml" in err[0]


def test_config_beside_the_checkpoint_is_used(scripts, tiny_files, tmp_path, capsys):
    # the community convention: <name>.yaml next to <name>.ckpt stands for --config
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(tiny_files.ckpt.read_bytes())
    (tmp_path / "model.yaml").write_text(tiny_files.config.read_text())
    out = tmp_path / "o"
    assert scripts.load("txt2img").main(["--ckpt", str(ckpt), "--device", "cpu", "--steps", "1", "--n_samples", "1",
                                         "--outdir", str(out)]) == 0
    assert (out / "samples" / "00000.png").is_file()
