"""Shared fixtures: a tiny text-to-image LatentDiffusion (16x16 pixels, 8x8x4 latents, f=2) whose
config and checkpoint are written to a temporary folder once per test session."""
import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
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
class TinyFiles:
    dir: Path
    config: Path
    ckpt: Path                # Lightning-style {"state_dict": ...}
    safetensors: Path
    state_dict: dict


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("tiny_ldm")
    model = build_tiny_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    config = write_config(TINY_CONFIG, folder / "tiny-ldm.yaml")
    torch.save({"state_dict": sd, "global_step": 0, "epoch": 0}, folder / "tiny-ldm.ckpt")
    save_file(sd, folder / "tiny-ldm.safetensors")
    return TinyFiles(folder, config, folder / "tiny-ldm.ckpt", folder / "tiny-ldm.safetensors", sd)


@pytest.fixture(scope="session")
def tiny_model(tiny_files):
    """The tiny model loaded through the public loader, on the CPU (shared: do not modify)."""
    from ldm.checkpoint import load_model
    return load_model(tiny_files.config, tiny_files.ckpt, device="cpu")


@pytest.fixture(scope="session")
def tiny():
    """The helpers above, for tests (importing ``conftest`` by name is fragile across folders)."""
    return SimpleNamespace(config=tiny_config, build=build_tiny_model, write_config=write_config)


REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_script(name):
    import importlib.util
    path = REPO_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(name, args, cwd):
    """Run ``scripts/<name>.py`` in a fresh interpreter, as a user would."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / f"{name}.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def scripts():
    """``scripts.load(name)`` imports a script module; ``scripts.run(name, args, cwd)`` runs it."""
    return SimpleNamespace(load=_load_script, run=_run_script)
