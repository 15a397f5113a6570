"""Tiny random-weight models for tests: a text-to-image LatentDiffusion (16x16 pixels, 8x8x4 latents,
f=2), the image-conditioned SD 2 families built on it (inpainting, depth, x4 upscaling, unCLIP) and
ControlNet's ControlLDM.

A plain module (``tests/`` is on ``sys.path`` under pytest, beside ``conftest.py``) so every test
file imports the same builders instead of loading another test file by its path.
"""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_UNET = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "attention_resolutions": [2, 1], "num_res_blocks": 1, "channel_mult": [1, 2],
        "num_head_channels": 8, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 32,
        "legacy": False, "use_checkpoint": False,
    },
}
TINY_VAE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    },
}
TINY_TEXT = {
    "target": "ldm.modules.encoders.modules.CLIPTokenTransformerEmbedder",
    "params": {"n_embed": 32, "n_layer": 1, "n_head": 4},
}
TINY_CONFIG = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000,
            "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8, "channels": 4,
            "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
            "unet_config": TINY_UNET, "first_stage_config": TINY_VAE,
            "cond_stage_config": TINY_TEXT,
        },
    },
}
# MiDaS DPT-hybrid and OpenCLIP ViT at toy widths, for the depth and unCLIP families.
TINY_DPT = dict(features=16, hooks=[0, 1, 2, 3], embed_dim=32, depth=4, num_heads=2, img_size=64)
TINY_OPENCLIP = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 56},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_config(**model_params):
    """A deep copy of the tiny config with ``model.params`` entries replaced."""
    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["params"].update(model_params)
    return config


def build_tiny_model(config=None, seed=0):
    """Instantiate the tiny model with seeded weights; zero-initialised layers (U-Net output,
    transformer projections) get small random values so outputs depend on every input."""
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(config or TINY_CONFIG).model)
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0.0, 0.05)
    return model.eval()


def write_config(config, path):
    from omegaconf import OmegaConf
    OmegaConf.save(OmegaConf.create(config), path)
    return Path(path)


@dataclass
class ModelFiles:
    config: Path
    ckpt: Path                # Lightning-style {"state_dict": ...}


def save_model_files(config, folder, name, state_dict=None):
    """Write ``<name>.yaml`` and ``<name>.ckpt`` into ``folder``; the weights are ``state_dict``, or
    those of ``build_tiny_model(config)`` when it is None."""
    if state_dict is None:
        state_dict = build_tiny_model(config).state_dict()
    folder = Path(folder)
    torch.save({"state_dict": state_dict}, folder / f"{name}.ckpt")
    return ModelFiles(config=write_config(config, folder / f"{name}.yaml"), ckpt=folder / f"{name}.ckpt")


# ------------------------------------------------------------------------------------------- SD 2 families
def variant_config(target, unet_params=(), **params):
    """The tiny config as model ``target``, with U-Net and ``model.params`` entries replaced."""
    config = tiny_config(**params)
    config["model"]["target"] = target
    config["model"]["params"]["unet_config"]["params"].update(dict(unet_params))
    return config


def inpaint_config(**params):
    return variant_config("ldm.models.diffusion.ddpm.LatentInpaintDiffusion", {"in_channels": 9},
                          conditioning_key="hybrid", finetune_keys=None, **params)


def depth_config():
    return variant_config("ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion", {"in_channels": 5},
                          conditioning_key="hybrid", finetune_keys=None,
                          depth_stage_config={"target": "ldm.modules.midas.api.MiDaSInference",
                                              "params": dict(model_type="dpt_hybrid", **TINY_DPT)})


def upscale_config():
    """x2 with the tiny VAE; noise levels 0..350, as the official x4 upscaler."""
    return variant_config(
        "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", {"in_channels": 7, "num_classes": 1000},
        conditioning_key="hybrid-adm", parameterization="v", low_scale_key="lr", linear_start=0.0001,
        linear_end=0.02, low_scale_config={
            "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
            "params": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02}, "max_noise_level": 350}})


def unclip_config(clip_stats_path=None):
    """Stable unCLIP with 16-wide image embeddings; ``clip_stats_path`` is a (mean, std) file."""
    noise_params = {"timestep_dim": 16, "noise_schedule_config": {"timesteps": 1000,
                                                                  "beta_schedule": "squaredcos_cap_v2"}}
    if clip_stats_path is not None:
        noise_params["clip_stats_path"] = str(clip_stats_path)
    return variant_config(
        "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion",
        {"num_classes": "sequential", "adm_in_channels": 32}, conditioning_key="crossattn-adm",
        parameterization="v", embedding_dropout=0.25,
        embedder_config={"target": "ldm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder",
                         "params": {"arch": TINY_OPENCLIP}},
        noise_aug_config={"target": "ldm.modules.encoders.modules.CLIPEmbeddingNoiseAugmentation",
                          "params": noise_params})


def with_random_layer_norms(encoder):
    """Fresh LayerNorms (weight 1, bias 0) make every output token zero-mean, which would leave the
    mean restored by emphasis "original" at ~0; trained encoders have no such symmetry."""
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.3, 0.2)
    return encoder


# ------------------------------------------------------------------------------------------- ControlNet
def controlnet_config(context_dim=32, **params):
    """The tiny model as ControlNet's ControlLDM: its U-Net as the locked ``ControlledUnetModel`` and a
    ``ControlNet`` copy of its encoder. The hint is 8x the latent size (64x64), as SD's is at pixel
    size; a ``context_dim`` other than the text encoder's 32 builds a model only for loading."""
    config = variant_config("cldm.cldm.ControlLDM", {"context_dim": context_dim}, control_key="hint",
                            only_mid_control=False, **params)
    unet = config["model"]["params"]["unet_config"]
    unet["target"] = "cldm.cldm.ControlledUnetModel"
    control_params = {k: v for k, v in unet["params"].items() if k != "out_channels"}
    config["model"]["params"]["control_stage_config"] = {"target": "cldm.cldm.ControlNet",
                                                         "params": {**control_params, "hint_channels": 3}}
    return config


def control_only(model):
    """A ControlLDM's ControlNet as control-only files hold it: its tensors without ``control_model.``."""
    return {k[len("control_model."):]: v.clone() for k, v in model.state_dict().items()
            if k.startswith("control_model.")}


def base_only(model):
    """What an SD checkpoint holds of a ControlLDM: everything but the ControlNet and logvar."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.startswith("control_model.") and k != "logvar"}
