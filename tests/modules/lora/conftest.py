"""Tiny random-weight models for the LoRA tests, one per text-encoder family, all with a U-Net of SD's
shape at toy width: 3 levels, 2 res blocks each, spatial transformers on the first two levels only (as SD
has none on its last), so downsamplers, upsamplers with and without attention and 1x1 skip convs occur.

- ``sd1_model``: conv 1x1 proj_in/proj_out (SD 1.x) and a Hugging Face CLIP text encoder (FrozenCLIPEmbedder);
- ``sd2_model``: linear proj_in/proj_out (SD 2.x) and an OpenCLIP text encoder (fused q/k/v in_proj_weight);
- ``shapes_like_model``: the tiny default text encoder (CLIPTokenTransformerEmbedder, fused qkv).

Each fixture gives a fresh copy, so a test may change its weights.
"""
import copy

import pytest

import torch

from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from tiny_models import TINY_TEXT, build_tiny_model, tiny_config

HF_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32)
OPENCLIP_TEXT = {"embed_dim": 32, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                               "heads": 4, "layers": 3}}
SD_LIKE_UNET = {"num_res_blocks": 2, "channel_mult": [1, 2, 2], "attention_resolutions": [1, 2]}


def sd_like_config(text_encoder, linear_proj):
    config = tiny_config(cond_stage_config=text_encoder)
    config["model"]["params"]["unet_config"]["params"].update(SD_LIKE_UNET, use_linear_in_transformer=linear_proj)
    return config


SD1_CONFIG = sd_like_config({"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                             "params": {"text_config": HF_TEXT}}, linear_proj=False)
# the OpenCLIP encoder is put in after the build: an arch dict that went through OmegaConf reaches
# open_clip as a DictConfig, which it cannot read
SD2_CONFIG = sd_like_config(TINY_TEXT, linear_proj=True)
SHAPES_LIKE_CONFIG = sd_like_config({"target": "ldm.modules.encoders.modules.CLIPTokenTransformerEmbedder",
                                     "params": {"n_embed": 32, "n_layer": 2, "n_head": 4}}, linear_proj=True)


@pytest.fixture(scope="module")
def _sd1():
    return build_tiny_model(SD1_CONFIG)


@pytest.fixture(scope="module")
def _sd2():
    model = build_tiny_model(SD2_CONFIG)
    torch.manual_seed(1)
    model.cond_stage_model = FrozenOpenCLIPEmbedder(arch=OPENCLIP_TEXT, layer="penultimate").eval()
    return model


@pytest.fixture(scope="module")
def _shapes_like():
    return build_tiny_model(SHAPES_LIKE_CONFIG)


@pytest.fixture
def sd1_model(_sd1):
    return copy.deepcopy(_sd1)


@pytest.fixture
def sd2_model(_sd2):
    return copy.deepcopy(_sd2)


@pytest.fixture
def shapes_like_model(_shapes_like):
    return copy.deepcopy(_shapes_like)
