"""--deepcache, --deepcache-depth, --tome and --int8: checked as one-line errors, passed to the library, and
recorded in the PNG only when on."""
import pytest

from ldm.image_io import read_parameters

KEYS = ("deepcache", "deepcache_depth", "tome", "int8")


@pytest.mark.parametrize("flags, message", [
    (["--tome", "0.9"], "--tome must be from 0.0 to 0.75"),
    (["--tome", "half"], "--tome takes a number"),
    (["--deepcache", "-1"], "--deepcache must be 0 or more"),
    (["--deepcache", "2.5"], "--deepcache takes a whole number"),
    (["--deepcache-depth", "2"], "--deepcache-depth sets the branch of --deepcache N"),
    (["--deepcache", "1", "--deepcache-depth", "2"], "pass --deepcache 2 or more with it"),
    (["--int8", "--device", "cuda"], "--int8 runs on the CPU only"),
])
def test_impossible_speedup_flags_are_one_line(scripts, tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert scripts.load("txt2img").main([*flags, "--outdir", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_a_depth_beyond_the_model_is_one_line(scripts, tiny_files, tmp_path, capsys):
    assert scripts.load("txt2img").main([*scripts.model_flags(tiny_files), "--deepcache", "2", "--deepcache-depth",
                                         "4", "--steps", "2", "--outdir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "from 0 to 3 for this U-Net" in err[0]


def _txt2img(scripts, tiny_files, out, *flags):
    assert scripts.load("txt2img").main([*scripts.model_flags(tiny_files), *flags, "--steps", "3", "--n_samples",
                                         "1", "--outdir", str(out), "--skip_grid", "--no-watermark"]) == 0
    return out / "samples" / "00000.png"


def test_png_records_the_speedups_that_are_on(scripts, tiny_files, tmp_path):
    from PIL import Image
    exact = _txt2img(scripts, tiny_files, tmp_path / "exact")
    assert not set(KEYS) & set(read_parameters(exact))
    with Image.open(exact) as image:
        assert "DeepCache" not in image.text["parameters"] and "Int8" not in image.text["parameters"]

    fast = _txt2img(scripts, tiny_files, tmp_path / "fast", "--deepcache", "2", "--tome", "0.5", "--int8")
    with Image.open(fast) as image:
        assert "DeepCache: 2, DeepCache depth: 0, Token merging ratio: 0.5, Int8: True" in image.text["parameters"]
    params = read_parameters(fast)
    assert {k: params[k] for k in KEYS} == {"deepcache": "2", "deepcache_depth": "0", "tome": "0.5", "int8": "True"}
    with Image.open(exact) as a, Image.open(fast) as b:
        assert a.tobytes() != b.tobytes()


def test_flags_reach_the_generation_api(scripts, tiny_files, tmp_path, monkeypatch):
    import ldm.generate
    seen = {}
    original = ldm.generate.approximated

    def recording(model, **options):
        seen.update(options)
        return original(model, **options)
    monkeypatch.setattr(ldm.generate, "approximated", recording)
    _txt2img(scripts, tiny_files, tmp_path / "o", "--deepcache", "3", "--deepcache-depth", "1", "--tome", "0.25")
    assert seen == {"deepcache": 3, "deepcache_depth": 1, "tome": 0.25, "int8": False}
