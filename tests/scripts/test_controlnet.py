"""scripts/controlnet.py end to end on a tiny ControlLDM, with its files written in the released layouts:
a base SD checkpoint, control-only .pth (prefixed) and fp16 safetensors (bare) ControlNets, a full
control_sd15_*.pth."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import (
    base_only,
    build_tiny_model,
    control_only,
    controlnet_config,
    tiny_config,
    write_config,
)

from ldm.image_io import read_parameters
from ldm.modules.lora.kohya_writer import legacy_model_hash


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet_script")
    controlled = build_tiny_model(controlnet_config(), seed=1)
    other = build_tiny_model(controlnet_config(), seed=4)
    torch.save({"state_dict": base_only(controlled), "global_step": 0}, folder / "v1-5-tiny.ckpt")
    torch.save({"control_model." + k: v for k, v in control_only(controlled).items()},
               folder / "control_v11p_sd15_canny.pth")
    save_file({k: v.half() for k, v in control_only(other).items()},
              folder / "control_v11f1p_sd15_depth_fp16.safetensors")
    torch.save(controlled.state_dict(), folder / "control_sd15_canny.pth")
    pixels = np.full((64, 64, 3), 30, dtype=np.uint8)
    pixels[16:48, 16:48] = (230, 220, 210)
    Image.fromarray(pixels).save(folder / "square.png")
    return {"dir": folder, "config": write_config(controlnet_config(), folder / "cldm_tiny.yaml"),
            "base_config": write_config(tiny_config(), folder / "sd_tiny.yaml"), "base": folder / "v1-5-tiny.ckpt",
            "canny": folder / "control_v11p_sd15_canny.pth",
            "depth": folder / "control_v11f1p_sd15_depth_fp16.safetensors",
            "full": folder / "control_sd15_canny.pth", "square": folder / "square.png"}


def common(files, out, *extra):
    return ["--ckpt", str(files["base"]), "--config", str(files["config"]), "--device", "cpu", "--steps", "2",
            "--n_samples", "1", "--seed", "3", "--no-watermark", "--outdir", str(out), *extra]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


def test_canny_hint_as_a_user_runs_it(scripts, files, tmp_path):
    out = tmp_path / "out"
    result = scripts.run("controlnet", common(files, out, "--control", str(files["canny"]), "--hint",
                                              str(files["square"]), "--preprocess", "canny", "--prompt", "a square"),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000-hint0.png", "00000.png"]
    with Image.open(out / "samples" / "00000-hint0.png") as hint:
        assert hint.size == (64, 64)   # the tiny model's hint is 8x its 8x8 latent
        assert set(np.unique(np.asarray(hint))) == {0, 255}
    params = read_parameters(out / "samples" / "00000.png")
    assert params["prompt"] == "a square" and params["size"] == "16x16"
    assert params["controlnet"] == [(
        f"Module: canny, Model: control_v11p_sd15_canny [{legacy_model_hash(files['canny'])}], Weight: 1, "
        "Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 64, Threshold A: 100, Threshold B: 200, "
        "Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: Balanced, Hr Option: Both, "
        "Save Detected Map: True")]
    with Image.open(out / "samples" / "00000.png") as image:
        assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [' in image.text["parameters"]


def test_strength_zero_gives_the_base_models_image(scripts, files, tmp_path):
    controlnet, txt2img = scripts.load("controlnet"), scripts.load("txt2img")
    assert controlnet.main(common(files, tmp_path / "cn", "--control", str(files["canny"]), "--hint",
                                  str(files["square"]), "--control-strength", "0", "--skip_grid")) == 0
    assert txt2img.main(["--ckpt", str(files["base"]), "--config", str(files["base_config"]), "--device", "cpu",
                         "--steps", "2", "--n_samples", "1", "--seed", "3", "--no-watermark", "--skip_grid",
                         "--outdir", str(tmp_path / "plain")]) == 0
    base = pixels(tmp_path / "plain" / "samples" / "00000.png")
    assert np.array_equal(pixels(tmp_path / "cn" / "samples" / "00000.png"), base)
    assert controlnet.main(common(files, tmp_path / "steered", "--control", str(files["canny"]), "--hint",
                                  str(files["square"]), "--skip_grid")) == 0
    assert np.abs(pixels(tmp_path / "steered" / "samples" / "00000.png") - base).max() > 5


def test_two_controlnets_with_their_own_settings(scripts, files, tmp_path):
    out = tmp_path / "out"
    assert scripts.load("controlnet").main(common(
        files, out, "--control", str(files["canny"]), "--control", str(files["depth"]), "--hint", str(files["square"]),
        "--preprocess", "canny", "--preprocess", "threshold", "--control-strength", "0.8", "--control-strength", "0.5",
        "--control-start", "0", "--control-start", "0.5", "--control-end", "0.5", "--control-end", "1", "--guess-mode",
        "--sampler", "Euler a", "--skip_grid")) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000-hint0.png", "00000-hint1.png", "00000.png"]
    first, second = read_parameters(out / "samples" / "00000.png")["controlnet"]
    assert first.startswith("Module: canny, Model: control_v11p_sd15_canny [") and "Weight: 0.8" in first
    assert "Guidance Start: 0, Guidance End: 0.5" in first and "Control Mode: ControlNet is more important" in first
    assert second.startswith("Module: threshold, Model: control_v11f1p_sd15_depth_fp16 [")
    assert "Threshold A: 127, Guidance Start: 0.5, Guidance End: 1" in second and "Threshold B" not in second


def test_a_full_controlnet_checkpoint_alone(scripts, files, tmp_path):
    out = tmp_path / "out"
    assert scripts.load("controlnet").main(["--ckpt", str(files["full"]), "--config", str(files["config"]),
                                            "--device", "cpu", "--steps", "2", "--n_samples", "1", "--hint",
                                            str(files["square"]), "--skip_grid", "--outdir", str(out)]) == 0
    (unit,) = read_parameters(out / "samples" / "00000.png")["controlnet"]
    assert unit.startswith("Module: none, Model: control_sd15_canny [") and "Processor Res" not in unit


@pytest.fixture
def bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (16, 16), "grey").save(tmp_path / "grey.png")
    return tmp_path


@pytest.mark.parametrize("flags, message", [
    (["--control", "{canny}"], "--hint IMAGE is needed"),
    (["--control", "{canny}", "--hint", "{dir}/missing.png"], "hint image '{dir}/missing.png' does not exist"),
    (["--control", "{canny}", "--hint", "{dir}/empty.png"], "is empty (0 bytes)"),
    (["--control", "{canny}", "--hint", "{dir}/text.png"], "cannot be read"),
    (["--control", "{canny}", "--hint", "{dir}/clear.png"], "transparent pixels"),
    (["--control", "{canny}", "--hint", "{dir}/grey.png", "--preprocess", "canny"], "blank"),
    (["--control", "{canny}", "--hint", "{dir}/grey.png", "--preprocess", "depth"], "needs --midas-weights"),
    (["--control", "{canny}", "--hint", "{dir}/grey.png", "--control-strength", "1", "--control-strength", "2"],
     "--control-strength is given 2 times for 1 ControlNets"),
    (["--control", "{canny}", "--hint", "{dir}/grey.png", "--control-start", "0.8", "--control-end", "0.2"],
     "--control-start 0.8 is after --control-end 0.2"),
    (["--control", "{canny}", "--hint", "{dir}/grey.png", "--preprocess", "sobel"], "invalid choice: 'sobel'"),
    (["--control", "{dir}/none.pth", "--hint", "{dir}/grey.png"], "ControlNet file '{dir}/none.pth' does not exist"),
    (["--control", "{base}", "--hint", "{dir}/grey.png"], "Stable Diffusion checkpoint without ControlNet weights"),
])
def test_impossible_flags_are_one_line_errors(scripts, files, bad_images, capsys, flags, message):
    fill = {"canny": files["canny"], "base": files["base"], "dir": bad_images}
    flags = [f.format(**fill) for f in flags]
    assert scripts.load("controlnet").main(common(files, bad_images / "out", *flags)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(**fill) in err[0], err
    assert not (bad_images / "out" / "samples").exists() or not any((bad_images / "out").rglob("*.png"))


def test_model_flags_it_needs(scripts, files, tmp_path, capsys, monkeypatch):
    import cldm.loading
    monkeypatch.setattr(cldm.loading, "DEFAULT_CONTROL", str(tmp_path / "not-shipped.safetensors"))
    controlnet = scripts.load("controlnet")
    hint = ["--hint", str(files["square"]), "--outdir", str(tmp_path)]
    assert controlnet.main(["--control", str(files["canny"]), *hint]) == 2
    assert "--control needs --ckpt" in capsys.readouterr().err
    assert controlnet.main(hint) == 2
    assert "no ControlNet is shipped with the default model yet" in capsys.readouterr().err
    assert controlnet.main(["--ckpt", str(files["base"]), "--config", str(files["config"]), "--device", "cpu",
                            *hint]) == 2
    assert "has no ControlNet weights" in capsys.readouterr().err


def test_the_shipped_controlnet_is_used_once_it_exists(scripts, files, tmp_path, monkeypatch):
    """The hook for the shipped model's ControlNet: without --ckpt and --control, DEFAULT_CONTROL (with
    its config beside it) is attached to the shipped base."""
    import shutil

    import cldm.loading
    import ldm.checkpoint
    shipped = tmp_path / "shapes-controlnet.pth"
    shutil.copy(files["canny"], shipped)
    shutil.copy(files["config"], tmp_path / "shapes-controlnet.yaml")
    monkeypatch.setattr(cldm.loading, "DEFAULT_CONTROL", str(shipped))
    monkeypatch.setattr(ldm.checkpoint, "DEFAULT_CKPT", str(files["base"]))
    out = tmp_path / "out"
    assert scripts.load("controlnet").main(["--hint", str(files["square"]), "--device", "cpu", "--steps", "2",
                                            "--n_samples", "1", "--skip_grid", "--outdir", str(out)]) == 0
    params = read_parameters(out / "samples" / "00000.png")
    assert params["controlnet"][0].startswith("Module: none, Model: shapes-controlnet [")
    assert params["scale"] == "4.0"   # the shipped model's defaults


def test_depth_hint_from_midas_weights(scripts, files, tmp_path, monkeypatch):
    """--preprocess depth loads the --midas-weights file (here a tiny MiDaS stands in for the release file)."""
    from tiny_models import TINY_DPT

    import cldm.preprocess
    from ldm.modules.midas.api import MiDaSInference
    loaded = []

    def tiny_midas(path, model_type):
        torch.manual_seed(0)
        midas = MiDaSInference(model_type, **TINY_DPT)
        with torch.no_grad():
            midas.model.scratch.output_conv[4].bias += 1.0   # keep the random depth above the final ReLU
        midas.has_weights = True
        loaded.append((path, model_type))
        return midas
    monkeypatch.setattr(cldm.preprocess, "load_midas", tiny_midas)
    weights = tmp_path / "dpt_hybrid-midas-501f0c75.pt"
    weights.write_bytes(b"stand-in")
    out = tmp_path / "out"
    assert scripts.load("controlnet").main(common(files, out, "--control", str(files["canny"]), "--hint",
                                                  str(files["square"]), "--preprocess", "depth", "--midas-weights",
                                                  str(weights), "--skip_grid")) == 0
    assert loaded == [(str(weights), "dpt_hybrid")]
    with Image.open(out / "samples" / "00000-hint0.png") as hint:
        assert hint.size == (64, 64) and np.asarray(hint).min() == 0 and np.asarray(hint).max() == 255
    (unit,) = read_parameters(out / "samples" / "00000.png")["controlnet"]
    assert unit.startswith("Module: depth_midas, ") and "Processor Res: 64, Guidance Start" in unit
