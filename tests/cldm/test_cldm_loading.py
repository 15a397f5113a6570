"""cldm.loading with files written here in the released layouts: full-model .pth (control_sd15_canny.pth:
a flat state dict with logvar), control-only .pth with the ``control_model.`` prefix
(control_v11p_sd15_*.pth) and fp16 safetensors extracts without it, attached to a base SD checkpoint."""
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import (
    base_only,
    build_tiny_model,
    control_only,
    controlnet_config,
    variant_config,
    write_config,
)

from cldm.loading import (
    config_for,
    default_config,
    load_control_net,
    load_controlnet_model,
)
from ldm.checkpoint import REPO_ROOT, load_model, suggest_config
from ldm.errors import UserError

PREFIX = "control_model."


def assert_same_weights(model, expected):
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def one_line_error(call):
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny ControlLDM config, a base SD checkpoint for it, and a ControlNet trained elsewhere."""
    folder = tmp_path_factory.mktemp("cldm")
    base = build_tiny_model(controlnet_config(), seed=3)
    control = build_tiny_model(controlnet_config(), seed=4)
    torch.save({"state_dict": base_only(base), "global_step": 0}, folder / "v1-5-tiny.ckpt")
    torch.save(control.state_dict(), folder / "control_sd15_tiny.pth")
    return {"full_path": folder / "control_sd15_tiny.pth", "dir": folder, "config": write_config(controlnet_config(), folder / "cldm_tiny.yaml"),
            "base_ckpt": folder / "v1-5-tiny.ckpt", "base": base_only(base), "control": control_only(control),
            "full": control.state_dict()}


def test_full_model_pth(files, tmp_path):
    path = tmp_path / "control_sd15_canny.pth"
    torch.save(files["full"], path)   # torch.save(model.state_dict()): flat, logvar included
    assert "logvar" in torch.load(path, weights_only=True)
    model = load_controlnet_model(path, config_path=files["config"], device="cpu")
    assert_same_weights(model, files["full"])
    assert_same_weights(load_model(files["config"], path, device="cpu"), files["full"])   # the generic loader too
    assert not model.training


@pytest.mark.parametrize("name, layout", [
    ("control_v11p_sd15_canny.pth", "prefixed"),
    ("control_v11p_sd15_canny.pth", "bare"),
    ("control_v11p_sd15_canny_fp16.safetensors", "bare"),
    ("control_v11p_sd15_canny_fp16.safetensors", "prefixed"),
])
def test_control_only_file_attached_to_a_base(files, tmp_path, name, layout):
    control = files["control"]
    stored = {(PREFIX + k if layout == "prefixed" else k): v for k, v in control.items()}
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.half() for k, v in stored.items()}, path)
        control = {k: v.half() for k, v in control.items()}
    else:
        torch.save(stored, path)
    model = load_controlnet_model(files["base_ckpt"], path, config_path=files["config"], device="cpu")
    assert_same_weights(model, files["base"])
    assert_same_weights(model, {PREFIX + k: v for k, v in control.items()})
    assert model.control_model.dtype == torch.float32
    assert torch.equal(model.logvar, torch.zeros(1000))


def test_control_file_replaces_the_one_in_a_full_model(files, tmp_path):
    full, control = tmp_path / "control_sd15_canny.pth", tmp_path / "control_v11p_sd15_canny.pth"
    base = build_tiny_model(controlnet_config(), seed=5).state_dict()
    torch.save(base, full)
    torch.save({PREFIX + k: v for k, v in files["control"].items()}, control)
    model = load_controlnet_model(full, control, config_path=files["config"], device="cpu")
    assert_same_weights(model, {PREFIX + k: v for k, v in files["control"].items()})
    assert_same_weights(model, {k: v for k, v in base.items() if not k.startswith(PREFIX)})


def test_config_beside_the_control_file(files, tmp_path):
    path = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save({PREFIX + k: v for k, v in files["control"].items()}, path)
    write_config(controlnet_config(), tmp_path / "control_v11p_sd15_canny.yaml")
    model = load_controlnet_model(files["base_ckpt"], path, device="cpu")
    assert_same_weights(model, {PREFIX + k: v for k, v in files["control"].items()})


def test_our_config_for_each_generation(tmp_path):
    folder = REPO_ROOT / "configs" / "controlnet"
    assert config_for(768) == folder / "cldm_v15.yaml"
    assert config_for(1024) == folder / "cldm_v21.yaml"
    assert config_for(768, tmp_path / "control_v11e_sd15_shuffle.pth") == folder / "control_v11e_sd15_shuffle.yaml"
    assert config_for(2048) is None
    assert all(config_for(w).is_file() for w in (768, 1024))
    assert default_config(tmp_path / "v2-1_512.ckpt", tmp_path / "control_sd21_depth.pth", 1024) == config_for(1024)
    assert "SDXL" in one_line_error(lambda: default_config(tmp_path / "a.ckpt", tmp_path / "b.pth", 2048))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """The tiny ControlLDM at SD 2.x's text width (1024) and an SD 2.x base for it (built only to load)."""
    folder = tmp_path_factory.mktemp("cldm_sd2")
    base = build_tiny_model(variant_config("ldm.models.diffusion.ddpm.LatentDiffusion", {"context_dim": 1024}))
    torch.save({"state_dict": base.state_dict()}, folder / "v2-1-tiny.ckpt")
    return {"config": write_config(controlnet_config(context_dim=1024), folder / "cldm_v21_tiny.yaml"),
            "base_ckpt": folder / "v2-1-tiny.ckpt"}


def test_sd2_base_with_sd2_control_loads(sd2, tmp_path):
    control = control_only(build_tiny_model(controlnet_config(context_dim=1024)))
    save_file(control, tmp_path / "control_sd21_canny.safetensors")
    model = load_controlnet_model(sd2["base_ckpt"], tmp_path / "control_sd21_canny.safetensors",
                                  config_path=sd2["config"], device="cpu")
    assert_same_weights(model, {PREFIX + k: v for k, v in control.items()})


def test_sd1_control_on_an_sd2_base_is_refused(sd2, tmp_path):
    sd1_control = control_only(build_tiny_model(controlnet_config(context_dim=768)))
    torch.save(sd1_control, tmp_path / "control_v11p_sd15_canny.pth")
    message = one_line_error(lambda: load_controlnet_model(
        sd2["base_ckpt"], tmp_path / "control_v11p_sd15_canny.pth", config_path=sd2["config"], device="cpu"))
    assert "is for SD 1.x (768-dim text context) but the base model is SD 2.x (1024-dim" in message
    assert "use a ControlNet made for SD 2.x" in message and "cldm_v15.yaml" in message


def test_base_of_another_generation_than_the_config_is_refused(sd2, files, tmp_path):
    torch.save({PREFIX + k: v for k, v in files["control"].items()}, tmp_path / "control.pth")
    sd1_config = write_config(controlnet_config(context_dim=768), tmp_path / "cldm_v15_tiny.yaml")
    message = one_line_error(lambda: load_controlnet_model(sd2["base_ckpt"], tmp_path / "control.pth",
                                                           config_path=sd1_config, device="cpu"))
    assert "base checkpoint" in message and "is SD 2.x (1024-dim text context)" in message
    assert "configs/controlnet/cldm_v21.yaml" in message


@pytest.mark.parametrize("content, expected", [
    ("base", "is a Stable Diffusion checkpoint without ControlNet weights"),
    ({"foo.weight": torch.zeros(2)}, "holds no ControlNet weights"),
    ({"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}, "diffusers-format ControlNet"),
    ({"difference": torch.tensor([]), "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
     "'difference' ControlNet"),
    ({"lora_controlnet": torch.tensor([]), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, "Control-LoRA"),
])
def test_a_file_that_is_no_controlnet_is_refused(files, tmp_path, content, expected):
    path = tmp_path / "not_a_controlnet.pth"
    torch.save(files["base"] if content == "base" else content, path)
    message = one_line_error(lambda: load_controlnet_model(files["base_ckpt"], path, config_path=files["config"],
                                                           device="cpu"))
    assert expected in message and str(path) in message


def test_a_base_without_control_file_is_refused(files):
    message = one_line_error(lambda: load_controlnet_model(files["base_ckpt"], config_path=files["config"],
                                                           device="cpu"))
    assert "has no ControlNet weights" in message


def test_an_incomplete_control_file_is_refused(files, tmp_path):
    control = {k: v for k, v in files["control"].items() if not k.startswith("zero_convs.3.")}
    torch.save(control, tmp_path / "control.pth")
    message = one_line_error(lambda: load_controlnet_model(files["base_ckpt"], tmp_path / "control.pth",
                                                           config_path=files["config"], device="cpu"))
    assert "2 missing" in message and "control_model.zero_convs.3.0" in message


def test_a_config_without_controlnet_is_refused(files, tmp_path):
    torch.save({PREFIX + k: v for k, v in files["control"].items()}, tmp_path / "control.pth")
    sd_config = write_config(variant_config("ldm.models.diffusion.ddpm.LatentDiffusion"), tmp_path / "sd.yaml")
    message = one_line_error(lambda: load_controlnet_model(files["base_ckpt"], tmp_path / "control.pth",
                                                           config_path=sd_config, device="cpu"))
    assert "no control_stage_config" in message and "cldm_v15.yaml" in message


def test_load_model_points_a_control_only_file_to_this_loader(files):
    shapes = {k: tuple(v.shape) for k, v in files["control"].items()}
    assert "cldm.loading.load_controlnet_model" in suggest_config(shapes)
    assert "cldm.loading" in suggest_config({PREFIX + k: s for k, s in shapes.items()})
    full = {k: tuple(v.shape) for k, v in files["full"].items()}
    assert "configs/controlnet/cldm_v15.yaml" in suggest_config(full)


# ----------------------------------------------------------------------------------- further ControlNets
def test_a_further_controlnet_beside_the_models_own(files, tmp_path):
    model = load_controlnet_model(files["full_path"], config_path=files["config"], device="cpu")
    other = control_only(build_tiny_model(controlnet_config(), seed=6))
    save_file({k: v.half() for k, v in other.items()}, tmp_path / "control_v11e_sd15_shuffle_fp16.safetensors")
    net, pooling = load_control_net(tmp_path / "control_v11e_sd15_shuffle_fp16.safetensors", model)
    assert pooling is True and net is not model.control_model and not net.training
    assert all(torch.equal(v, other[k].half().float()) for k, v in net.state_dict().items())
    assert next(net.parameters()).dtype == torch.float32
    # with its config beside it: built from that config, pooling as it says
    torch.save({PREFIX + k: v for k, v in other.items()}, tmp_path / "control_v11p_sd15_canny.pth")
    write_config(controlnet_config(global_average_pooling=True), tmp_path / "control_v11p_sd15_canny.yaml")
    net, pooling = load_control_net(tmp_path / "control_v11p_sd15_canny.pth", model)
    assert pooling is True and all(torch.equal(v, other[k]) for k, v in net.state_dict().items())


def test_a_further_controlnet_of_another_generation_is_refused(files, tmp_path):
    model = load_controlnet_model(files["full_path"], config_path=files["config"], device="cpu")
    torch.save(control_only(build_tiny_model(controlnet_config(context_dim=1024))), tmp_path / "control_sd21.pth")
    message = one_line_error(lambda: load_control_net(tmp_path / "control_sd21.pth", model))
    assert "is for SD 2.x (1024-dim text context) but the model's own ControlNet is for a model with 32-dim" \
        in message


def conv_projection_config():
    """The tiny ControlLDM with SD 1.5's 1x1-conv proj_in/proj_out instead of SD 2.x's linear ones."""
    config = controlnet_config()
    for part in ("unet_config", "control_stage_config"):
        config["model"]["params"][part]["params"]["use_linear_in_transformer"] = False
    return config


@pytest.mark.parametrize("own_conv", [False, True])
def test_projections_stored_in_the_other_layout_are_reshaped(files, tmp_path, own_conv):
    """Third-party extracts store proj_in/proj_out as [C, C] where the config has 1x1 convs [C, C, 1, 1],
    or the other way round: the same numbers, loaded into the layout of the config."""
    config = conv_projection_config() if own_conv else controlnet_config()
    source = build_tiny_model(config, seed=6)
    own = control_only(source)
    stored = {}
    for key, value in own.items():
        if key.endswith(("proj_in.weight", "proj_out.weight")):
            value = value.flatten(1) if own_conv else value[..., None, None]
        stored[key] = value
    assert any(stored[k].shape != own[k].shape for k in own)
    path = tmp_path / "control_v11p_sd15_canny_fp16.safetensors"
    save_file(stored, path)
    config_path = write_config(config, tmp_path / "cldm.yaml")
    torch.save({"state_dict": base_only(source)}, tmp_path / "base.ckpt")
    model = load_controlnet_model(tmp_path / "base.ckpt", path, config_path=config_path, device="cpu")
    assert_same_weights(model, {PREFIX + k: v for k, v in own.items()})
