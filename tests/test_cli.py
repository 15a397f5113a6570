"""Model-aware defaults and the attention options the scripts derive from flags and environment."""
from types import SimpleNamespace

from ldm.cli import (OFFICIAL_DEFAULTS, SHIPPED_DEFAULTS, attention_options, fill_model_defaults,
                     resolve_sampler_flags, shipped_sampling)


def test_shipped_model_defaults_apply_only_without_ckpt():
    args = SimpleNamespace(ckpt=None, config=None, prompt=None, steps=None, scale=None, from_file=None)
    fill_model_defaults(args)
    assert (args.prompt, args.steps, args.scale) == tuple(SHIPPED_DEFAULTS[k] for k in ("prompt", "steps", "scale"))
    args = SimpleNamespace(ckpt="sd.ckpt", config="v1.yaml", prompt=None, steps=7, scale=None, from_file="p.txt")
    fill_model_defaults(args)
    assert args.steps == 7 and args.scale == OFFICIAL_DEFAULTS["scale"] and args.prompt is None


def test_shipped_sampling_is_what_the_scripts_use_without_flags():
    """The library-side defaults (benches, tests) are the scripts' own for the shipped model."""
    args = SimpleNamespace(ckpt=None, config=None, prompt=None, steps=None, scale=None, from_file=None, sampler=None,
                           schedule=None, sigmas=None, spacing=None)
    fill_model_defaults(args)
    resolve_sampler_flags(args)
    assert shipped_sampling() == {"sampler": args.sampler, "schedule": args.schedule, "steps": args.steps,
                                  "scale": args.scale}


def test_attention_precision_follows_attn_precision():
    args = SimpleNamespace(attention="sdpa")
    assert attention_options(args, environ={}) == ("sdpa", "auto")
    assert attention_options(args, environ={"ATTN_PRECISION": "fp32"}) == ("sdpa", True)
    assert attention_options(args, environ={"ATTN_PRECISION": "fp16"}) == ("sdpa", False)
    # without CUDA, auto never picks xformers
    assert attention_options(SimpleNamespace(attention="auto"), environ={})[0] == "sdpa"


# ---------------------------------------------------------------------------------------------
# the docs list exactly the flags the parsers take

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm.image_io import read_parameters  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLING_SCRIPTS = ("txt2img", "img2img", "inpaint", "depth2img", "upscale", "unclip", "controlnet")
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


def _section(text, heading):
    """The text under the first heading line containing ``heading``, up to the next heading."""
    lines, fenced = [], False
    for line in text.splitlines():   # comments in code blocks are not headings
        fenced ^= line.startswith("```")
        lines.append("" if fenced else line)
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return lines[start + 1:end]


def _table_flags(lines):
    """{flag: last cell} of a markdown table's rows (first cell holds one or more flags)."""
    flags = {}
    for line in lines:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            for flag in FLAG.findall(cells[0]):
                flags[flag] = cells[-1]
    return flags


def _documented_flags(script):
    readme = (REPO / "README.md").read_text()
    variants = (REPO / "docs" / "variants.md").read_text()
    common = _table_flags(_section(readme, "Flags of the sampling scripts"))
    flags = {f for f, scope in common.items() if scope == "all" or script in scope.split(", ")}
    own = _section(readme, f"`scripts/{script}.py`") if script in ("txt2img", "img2img") \
        else _section(variants, f"`scripts/{script}.py`")
    return flags | set(_table_flags(own)) | {"--help"}


def _parser_flags(scripts, script):
    parser = scripts.load(script).build_parser()
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


@pytest.mark.parametrize("script", SAMPLING_SCRIPTS)
def test_docs_list_exactly_the_flags_each_script_takes(scripts, script):
    assert _documented_flags(script) == _parser_flags(scripts, script)


@pytest.mark.parametrize("script, flag", [("img2img", "--H"), ("img2img", "--fixed_code"), ("upscale", "--H")])
def test_flags_a_script_does_not_take_are_refused(scripts, tmp_path, capsys, script, flag):
    (tmp_path / "x.png").write_bytes(b"")
    assert scripts.load(script).main(["--init-img", str(tmp_path / "x.png"), flag,
                                      "--outdir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: unrecognized arguments") and flag in err[0]


# ---------------------------------------------------------------------------------------------
# settings that would be recorded but not used are refused

@pytest.mark.parametrize("sampler_flag", ["--dpm", "--plms"])
def test_eta_with_a_deterministic_sampler_is_refused(scripts, tmp_path, capsys, sampler_flag):
    out = tmp_path / "out"
    assert scripts.load("txt2img").main([sampler_flag, "--ddim_eta", "0.5", "--outdir", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --ddim_eta: ") and "DDIM only" in err[0]
    assert not out.exists()


def test_library_refuses_eta_for_dpm(tiny_model):
    from ldm.errors import UserError
    from ldm.generate import txt2img
    with pytest.raises(UserError, match="deterministic"):
        txt2img(tiny_model, "a red circle", sampler="dpm", steps=2, eta=0.5, progress=False)


def test_outdir_that_is_a_file_is_one_line_and_the_file_is_kept(scripts, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert scripts.load("txt2img").main(["--outdir", str(target), "--steps", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --outdir") and "is a file" in err[0]
    assert target.read_text() == "keep me"


def test_outdir_under_a_file_is_one_line(scripts, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert scripts.load("txt2img").main(["--outdir", str(tmp_path / "file" / "sub"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "which is a file" in err[0]


def test_unwritable_outdir_fails_before_sampling(tiny_model, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ldm import cli
    from ldm.errors import UserError

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "mkdir", refuse)
    args = SimpleNamespace(outdir=str(tmp_path / "out"), no_watermark=True, skip_save=False)
    with pytest.raises(UserError, match="cannot create the output folder .*Permission denied"):
        cli.Saver(args, {})


def test_grid_parameters_name_the_prompts_it_shows(scripts, tiny_files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    flags = ["--ckpt", str(tiny_files.ckpt), "--config", str(tiny_files.config), "--device", "cpu"]
    assert scripts.load("txt2img").main([*flags, "--from-file", str(prompts), "--repeat", "2",
                                         "--n_samples", "2", "--steps", "1", "--outdir", str(out)]) == 0
    grid = read_parameters(out / "grid-0000.png")
    assert grid["prompt"] == "a red circle\na blue square"
    assert grid["steps"] == "1" and grid["size"] == "16x16"


# ---------------------------------------------------------------------------------------------
# samplers and schedules by the web UIs' names, recorded as A1111 records them

@pytest.mark.parametrize("text, expected", [
    ("DDIM", ("ddim", None)), ("euler A", ("euler_ancestral", None)), ("k_euler_a", ("euler_ancestral", None)),
    ("dpm++ 2m", ("dpmpp_2m", None)), ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("dpmpp_2m_sde", ("dpmpp_2m_sde", None)), ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")),
    ("DPM2 a", ("dpm_2_ancestral", None)), ("UniPC", ("unipc_bh1", None)), ("lcm", ("lcm", None)),
])
def test_sampler_names_resolve_case_insensitively(text, expected):
    from ldm.models.diffusion.samplers import resolve_sampler
    assert resolve_sampler(text) == expected


def test_schedule_names_resolve():
    from ldm.models.diffusion.samplers import resolve_schedule
    assert [resolve_schedule(t) for t in ("Karras", "align your steps", "Uniform", "automatic", "beta")] == \
        ["karras", "align_your_steps", "normal", "automatic", "beta"]


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "Euler b"], "unknown sampler 'Euler b'"),
    (["--sampler", "DDIM", "--schedule", "Karras"], "walks the model's own timesteps"),
    (["--plms", "--sigmas", "3,1"], "walks the model's own timesteps"),
    (["--sampler", "Euler", "--schedule", "Karras", "--sigmas", "3,1"], "either --schedule or --sigmas"),
    (["--sampler", "Euler", "--sigmas", "1,3"], "--sigmas: sigmas must be strictly descending"),
    (["--sampler", "Euler", "--schedule", "Fast"], "unknown schedule 'Fast'"),
    (["--sampler", "Euler", "--plms"], "not allowed with argument"),
])
def test_impossible_sampler_settings_are_one_line(scripts, tmp_path, capsys, flags, message):
    assert scripts.load("txt2img").main([*flags, "--outdir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_img2img_and_depth2img_take_every_sampler(scripts, tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    for script in ("img2img", "depth2img"):
        for flag in ("--plms", "--dpm"):
            args = scripts.load(script).build_parser().parse_args(["--init-img", str(tmp_path / "x.png"), flag])
            assert getattr(args, flag[2:])


@pytest.mark.parametrize("flags, sampler, schedule", [
    (["--sampler", "dpm++ 2m", "--schedule", "karras"], "DPM++ 2M", "Karras"),
    (["--sampler", "DPM++ 2M SDE"], "DPM++ 2M SDE", "Exponential"),
    (["--sampler", "Euler a", "--sigmas", "8,2,0.5"], "Euler a", "Custom sigmas"),
    (["--plms"], "PLMS", None),
])
def test_png_records_sampler_and_schedule_as_a1111_does(scripts, tiny_files, tmp_path, flags, sampler, schedule):
    from PIL import Image
    out = tmp_path / "out"
    assert scripts.load("txt2img").main([*scripts.model_flags(tiny_files), *flags, "--steps", "3", "--n_samples",
                                         "1", "--outdir", str(out), "--skip_grid"]) == 0
    with Image.open(out / "samples" / "00000.png") as image:
        text = image.text["parameters"]
    expected = f"Sampler: {sampler}" + (f", Schedule type: {schedule}" if schedule else "")
    assert expected + ", CFG scale: " in text
    params = read_parameters(out / "samples" / "00000.png")
    assert params["sampler"] == sampler and params.get("schedule") == schedule


def test_spacing_and_cfg_rescale_reach_the_sampler_and_the_png(scripts, tiny_files, tmp_path, monkeypatch):
    from ldm.models.diffusion.ddim import DDIMSampler
    seen = {}
    original = DDIMSampler.sample

    def recording(self, *args, **kwargs):
        seen.update(spacing=kwargs.get("timestep_spacing"), rescale=kwargs.get("guidance_rescale"))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(DDIMSampler, "sample", recording)
    out = tmp_path / "out"
    assert scripts.load("txt2img").main([*scripts.model_flags(tiny_files), "--spacing", "trailing",
                                         "--guidance-rescale", "0.7", "--steps", "2", "--n_samples", "1",
                                         "--outdir", str(out), "--skip_grid"]) == 0
    assert seen == {"spacing": "trailing", "rescale": 0.7}
    params = read_parameters(out / "samples" / "00000.png")
    assert params["spacing"] == "trailing" and params["guidance_rescale"] == "0.7"


def test_vae_tiling_reaches_the_decode_and_the_png(scripts, tiny_files, tmp_path, monkeypatch):
    from ldm.models import tiled_vae
    seen = []
    original = tiled_vae.decode

    def recording(autoencoder, z, mode="off", tiling=tiled_vae.Tiling(), channels_last=False):
        seen.append((mode, channels_last, tiling.preview_norms))
        return original(autoencoder, z, mode, tiling, channels_last)
    monkeypatch.setattr(tiled_vae, "decode", recording)
    common = [*scripts.model_flags(tiny_files), "--steps", "1", "--n_samples", "1", "--skip_grid"]
    assert scripts.load("txt2img").main([*common, "--vae-tiling", "on", "--outdir", str(tmp_path / "on")]) == 0
    assert scripts.load("txt2img").main([*common, "--outdir", str(tmp_path / "auto")]) == 0
    assert scripts.load("txt2img").main([*common, "--vae-tiling", "on", "--vae-tiling-stats", "preview",
                                         "--outdir", str(tmp_path / "preview")]) == 0
    assert seen == [("on", True, False), ("auto", True, False), ("on", True, True)]
    assert read_parameters(tmp_path / "on" / "samples" / "00000.png")["vae_tiling"] == "on"
    assert read_parameters(tmp_path / "auto" / "samples" / "00000.png")["vae_tiling"] == "auto"
    # the default statistics are not written; the estimated ones are
    assert "vae_tiling_stats" not in read_parameters(tmp_path / "on" / "samples" / "00000.png")
    assert read_parameters(tmp_path / "preview" / "samples" / "00000.png")["vae_tiling_stats"] == "preview"


def test_library_refuses_an_unknown_vae_tiling(tiny_model):
    from ldm.errors import UserError
    from ldm.generate import txt2img
    with pytest.raises(UserError, match="VAE tiling 'always' is unknown; use auto, on, off"):
        txt2img(tiny_model, "a red circle", steps=1, n_samples=1, vae_tiling="always", progress=False)
    with pytest.raises(UserError, match="VAE tiling statistics 'tile' are unknown; use image, preview"):
        txt2img(tiny_model, "a red circle", steps=1, n_samples=1, vae_tiling_stats="tile", progress=False)


@pytest.mark.parametrize("flags, message", [
    (["--vae-tiling", "always"], "argument --vae-tiling: invalid choice: 'always'"),
    (["--sampler", "Euler", "--spacing", "trailing"], "--spacing sets DDIM/PLMS timesteps"),
    (["--guidance-rescale", "1.5"], "--guidance-rescale must be from 0.0 to 1.0"),
    (["--clip-skip", "0"], "--clip-skip must be 1 or more"),
    (["--emphasis", "loud"], "invalid choice"),
])
def test_impossible_prompt_and_schedule_flags(scripts, tmp_path, capsys, flags, message):
    assert scripts.load("txt2img").main([*flags, "--outdir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0]


def test_every_registered_sampler_runs_through_txt2img(tiny_model):
    # one registry line per sampler: each runs end to end through the generation API
    from ldm.generate import txt2img
    from ldm.models.diffusion.samplers import SAMPLERS
    for name in SAMPLERS:
        images = txt2img(tiny_model, "a red circle", sampler=name, steps=3, n_samples=1, progress=False)
        assert len(images) == 1 and images[0].size == (16, 16), name


def test_dpm2_drops_the_next_to_last_sigma_as_a1111(tiny_model):
    # A1111 builds n + 1 sigmas and drops the next-to-last for DPM2 / DPM2 a / 3M SDE, in txt2img and img2img
    from ldm.generate import make_sampler
    from ldm.models.diffusion.k_sampling import make_sigmas
    sampler = make_sampler("dpm_2", tiny_model)
    denoiser = sampler.denoiser(None)
    six = make_sigmas("karras", 6, denoiser)
    expected = torch.cat([six[:5], six[6:]])
    assert sampler.schedule == "karras" and torch.equal(sampler.sigmas_for(5, denoiser), expected)
    assert torch.equal(sampler.img2img_sigmas(5, 0.6, denoiser), expected[2:])
    assert not make_sampler("euler", tiny_model).discard_next_to_last_sigma
    assert len(make_sampler("euler", tiny_model).sigmas_for(5, denoiser)) == 6


def test_img2img_with_a_sigma_sampler(tiny_model):
    from PIL import Image
    from ldm.generate import img2img
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    kept = img2img(tiny_model, init, "a red circle", strength=0.0, sampler="euler", steps=4, progress=False)
    changed = img2img(tiny_model, init, "a red circle", strength=0.75, sampler="dpmpp_2m", steps=4, progress=False)
    assert kept[0].size == changed[0].size == (64, 64)


def test_winograd_flag_runs_the_unet_convolutions_by_winograd_with_the_same_images(scripts, tiny_files, tmp_path,
                                                                                  monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from ldm.modules import winograd
    calls = []
    original = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)   # the tiny U-Net's are narrower than where it pays
    common = [*scripts.model_flags(tiny_files), "--steps", "3", "--n_samples", "1", "--skip_grid", "--no-bf16"]
    assert scripts.load("txt2img").main([*common, "--outdir", str(tmp_path / "plain")]) == 0
    assert calls == []
    assert scripts.load("txt2img").main([*common, "--winograd", "0.5", "--outdir", str(tmp_path / "winograd")]) == 0
    assert calls   # the first step plans the cache, the later ones run by Winograd (the top level's 8x8 maps)
    plain, fast = (np.asarray(Image.open(tmp_path / run / "samples" / "00000.png"), dtype=np.int16)
                   for run in ("plain", "winograd"))
    assert np.abs(plain - fast).max() <= 1
    assert scripts.load("txt2img").main([*common, "--winograd", "-1", "--outdir", str(tmp_path / "bad")]) == 2
    assert "--winograd must be 0.0 or more" in capsys.readouterr().err
