"""``ckpt_path`` / ``ignore_keys`` / ``load_only_unet`` / ``reset_ema``: the one loading step that runs
after the most-derived constructor, through ``ldm.checkpoint.load_state_dict_into``."""
import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm import checkpoint
from ldm.errors import UserError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config
from tiny_models import TINY_VAE, inpaint_config, tiny_config, upscale_config

UNET_OUT = "model.diffusion_model.out.2.weight"
VAE_OUT = "first_stage_model.decoder.conv_out.weight"
TEXT_KEY = "cond_stage_model.token_embedding.weight"


def build(config, seed):
    """Construct from ``config`` with seeded initial weights (no test-side re-initialisation, so two
    builds with one seed agree on every weight they do not load)."""
    torch.manual_seed(seed)
    return instantiate_from_config(OmegaConf.create(config).model)


def save(sd, path):
    torch.save({"state_dict": sd}, path)
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A text-to-image model with EMA (seed 1) saved Lightning-style, and a seed-2 reference build."""
    model = build(tiny_config(use_ema=True), seed=1)
    with torch.no_grad():  # the U-Net output starts at zero: make "loaded" and "not loaded" differ
        model.model.diffusion_model.out[2].weight.normal_()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = save(sd, tmp_path_factory.mktemp("init_ckpt") / "source.ckpt")
    return SimpleNamespace(path=path, sd=sd, reference=build(tiny_config(), seed=2).state_dict())


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_reset_ema_rebuilds_the_ema_with_ema_decay(source):
    model = build(tiny_config(use_ema=True, ema_decay=0.5, ckpt_path=source.path, reset_ema=True), seed=2)
    assert float(model.model_ema.decay) == 0.5
    assert int(model.model_ema.num_updates) == 0
    torch.testing.assert_close(model.model_ema.diffusion_modelout2weight, source.sd[UNET_OUT])
    assert model.restarted_from_ckpt


def test_reset_ema_needs_use_ema():
    with pytest.raises(UserError, match="use_ema"):
        build(tiny_config(reset_ema=True), seed=0)


def test_ckpt_path_loads_everything(source):
    model = build(tiny_config(ckpt_path=source.path), seed=2)
    own = model.state_dict()
    for key in (UNET_OUT, VAE_OUT, TEXT_KEY):
        torch.testing.assert_close(own[key], source.sd[key])


def test_ignore_keys_keep_the_models_own_values(source, caplog):
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        model = build(tiny_config(ckpt_path=source.path, ignore_keys=["cond_stage_model"]), seed=2)
    own = model.state_dict()
    torch.testing.assert_close(own[TEXT_KEY], source.reference[TEXT_KEY])
    torch.testing.assert_close(own[UNET_OUT], source.sd[UNET_OUT])
    assert not warnings_of(caplog)  # keys one asked to skip are not "missing"


@pytest.mark.parametrize("whole_checkpoint", [True, False])
def test_load_only_unet_loads_the_denoiser_alone(source, tmp_path, whole_checkpoint):
    if whole_checkpoint:
        path = source.path
    else:  # the official form: a checkpoint of ``model`` (the DiffusionWrapper) itself
        path = save({k[len("model."):]: v for k, v in source.sd.items() if k.startswith("model.")},
                    tmp_path / "unet.ckpt")
    model = build(tiny_config(ckpt_path=path, load_only_unet=True), seed=2)
    own = model.state_dict()
    torch.testing.assert_close(own[UNET_OUT], source.sd[UNET_OUT])
    for key in (VAE_OUT, TEXT_KEY):
        torch.testing.assert_close(own[key], source.reference[key])


def test_missing_and_unexpected_keys_are_warnings(source, tmp_path, caplog):
    sd = dict(source.sd)
    del sd[VAE_OUT]
    sd["stray.weight"] = torch.zeros(1)
    path = save(sd, tmp_path / "gappy.ckpt")
    with caplog.at_level(logging.INFO):
        build(tiny_config(ckpt_path=path), seed=2)
    messages = warnings_of(caplog)
    assert any("1 missing keys" in m and VAE_OUT in m for m in messages), messages
    assert any("1 unexpected keys" in m and "stray.weight" in m for m in messages), messages


def test_autoencoder_ckpt_path_goes_through_the_same_loader(source, tmp_path, caplog):
    vae = {k[len("first_stage_model."):]: v for k, v in source.sd.items() if k.startswith("first_stage_model.")}
    del vae["decoder.conv_out.bias"]
    path = save(vae, tmp_path / "vae.ckpt")
    config = {"model": dict(TINY_VAE, params=dict(TINY_VAE["params"], ckpt_path=path,
                                                  ignore_keys=["encoder.conv_in"]))}
    with caplog.at_level(logging.INFO):
        model = build(config, seed=2)
    torch.testing.assert_close(model.decoder.conv_out.weight, source.sd[VAE_OUT])
    assert not torch.equal(model.encoder.conv_in.weight, source.sd["first_stage_model.encoder.conv_in.weight"])
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "1 missing keys" in messages[0] and "decoder.conv_out.bias" in messages[0]


def test_finetune_widening_feeds_the_same_loader(source, tmp_path, caplog):
    sd = dict(source.sd)
    del sd[VAE_OUT]
    path = save(sd, tmp_path / "txt2img.ckpt")
    config = inpaint_config(ckpt_path=path)
    del config["model"]["params"]["finetune_keys"]  # the default: the U-Net input conv (and its EMA copy)
    with caplog.at_level(logging.INFO):
        model = build(config, seed=2)
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert weight.shape[1] == 9 and (weight[:, 4:] == 0).all()
    torch.testing.assert_close(weight[:, :4], sd[checkpoint.UNET_IN_KEY])
    assert any("1 missing keys" in m and VAE_OUT in m for m in warnings_of(caplog))


def test_a_shape_mismatch_is_a_user_error(source):
    with pytest.raises(UserError, match="ckpt_path .* 1 tensors do not fit LatentInpaintDiffusion") as err:
        build(inpaint_config(ckpt_path=source.path), seed=2)  # finetune_keys: None, so nothing widens
    assert checkpoint.UNET_IN_KEY in str(err.value) and "\n" not in str(err.value)


class WithExtraStage(LatentDiffusion):
    """A user's subclass that adds a sub-model after ``super().__init__``, with no loading code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_stage = torch.nn.Linear(3, 3)


class NoOwnInit(WithExtraStage):
    pass


@pytest.mark.parametrize("cls", [WithExtraStage, NoOwnInit])
def test_loads_once_after_the_outermost_constructor(source, tmp_path, monkeypatch, cls):
    params = tiny_config()["model"]["params"]
    torch.manual_seed(1)
    sd = dict(source.sd, **{f"extra_stage.{k}": v for k, v in torch.nn.Linear(3, 3).state_dict().items()})
    path = save(sd, tmp_path / "extra.ckpt")
    calls = []
    loader = checkpoint.load_state_dict_into
    monkeypatch.setattr(checkpoint, "load_state_dict_into", lambda *a, **k: calls.append(1) or loader(*a, **k))
    model = cls(ckpt_path=path, **params)
    assert len(calls) == 1
    torch.testing.assert_close(model.extra_stage.weight, sd["extra_stage.weight"])
    torch.testing.assert_close(model.state_dict()[UNET_OUT], source.sd[UNET_OUT])


def test_upscaler_low_scale_buffers_come_from_the_checkpoint(tmp_path):
    saved = build(upscale_config(), seed=1)
    sd = saved.state_dict()
    sd["low_scale_model.sqrt_alphas_cumprod"] = torch.full_like(sd["low_scale_model.sqrt_alphas_cumprod"], 0.5)
    config = upscale_config()
    config["model"]["params"]["ckpt_path"] = save(sd, tmp_path / "upscale.ckpt")
    model = build(config, seed=2)
    assert (model.low_scale_model.sqrt_alphas_cumprod == 0.5).all()
