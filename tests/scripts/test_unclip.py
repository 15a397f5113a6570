import pytest
import torch

from ldm.image_io import read_parameters
from tiny_models import save_model_files, unclip_config


@pytest.fixture(scope="module")
def unclip_files(tmp_path_factory):
    """A tiny stable unCLIP checkpoint (16-wide image embeddings, levels 0..999) and its config."""
    folder = tmp_path_factory.mktemp("tiny_unclip")
    torch.save((torch.zeros(16), torch.ones(16)), folder / "stats.th")
    return save_model_files(unclip_config(folder / "stats.th"), folder, "unclip")


@pytest.fixture
def init_png(random_png):
    return random_png("init.png", 20, 24)


def test_unclip_subprocess_makes_variations(scripts, unclip_files, tmp_path, init_png):
    out = tmp_path / "out"
    result = scripts.run("unclip", [*scripts.model_flags(unclip_files), "--init-img", str(init_png), "--steps", "2",
                                    "--noise_level", "100", "--n_samples", "2", "--outdir", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00000.png")
    assert params["prompt"] == "" and params["size"] == "16x16" and params["scale"] == "10.0"


def test_unclip_from_an_embedding_file(scripts, unclip_files, tmp_path, capsys):
    unclip = scripts.load("unclip")
    torch.save(torch.randn(1, 16), tmp_path / "embedding.pt")
    out = tmp_path / "out"
    assert unclip.main([*scripts.model_flags(unclip_files), "--embedding", str(tmp_path / "embedding.pt"),
                        "--prompt", "snow", "--H", "24", "--W", "16", "--steps", "2", "--n_samples", "1",
                        "--outdir", str(out)]) == 0
    assert read_parameters(out / "samples" / "00000.png")["size"] == "16x24"


@pytest.mark.parametrize("flags, message", [
    ([], "pass --init-img (an image) or --embedding"),
    (["--init-img", "missing.png"], "init image 'missing.png' does not exist"),
    (["--init-img", "{init}", "--embedding", "{emb}"], "not allowed with argument"),
    (["--init-img", "{init}", "--noise_level", "1000"], "noise level 1000 is out of range for this model"),
    (["--init-img", "{init}", "--noise_level", "-5"], "--noise_level must be 0 or more"),
    (["--init-img", "{init}", "--H", "20"], "--H must be a positive multiple of 8, got 20"),
    (["--embedding", "{wide}"], "the embedding has width 32 but this model takes 16"),
])
def test_impossible_flags(scripts, unclip_files, tmp_path, capsys, init_png, flags, message):
    unclip = scripts.load("unclip")
    torch.save(torch.randn(16), tmp_path / "emb.pt")
    torch.save(torch.randn(32), tmp_path / "wide.pt")
    flags = [f.format(init=init_png, emb=tmp_path / "emb.pt", wide=tmp_path / "wide.pt") for f in flags]
    assert unclip.main([*scripts.model_flags(unclip_files), "--steps", "2", "--outdir", str(tmp_path / "out"),
                        *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not any((tmp_path / "out").rglob("*.png"))
