"""CLIP image encoders for Stable unCLIP: image in [-1, 1] -> pooled, projected CLIP image embedding.

Both are built from architecture hyper-parameters only (no pretrained download); the weights come
from the SD checkpoint's ``embedder.*`` keys.

    FrozenOpenCLIPImageEmbedder  OpenCLIP ViT-H-14 without its text transformer (unCLIP-H, [B, 1024])
    ClipImageEmbedder            OpenAI CLIP ViT-L/14, both towers kept as in the official model
                                 (unCLIP-L, [B, 768]); the same module tree and key names as the
                                 ``clip`` package's model, built through open_clip with QuickGELU
"""
import copy

import torch

from ldm.errors import UserError
from ldm.modules.encoders.base import AbstractEncoder, freeze_module, parameter_device

# CLIP's image normalisation (the same for OpenAI and OpenCLIP models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The names the ``clip`` package knows, as open_clip architecture configs (all use QuickGELU).
OPENAI_CLIP_ARCHS = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                     "ViT-L/14@336px": "ViT-L-14-336"}


def _model_config(arch):
    import open_clip  # deferred: importing open_clip takes seconds
    if not isinstance(arch, str):
        from omegaconf import OmegaConf
        # open_clip reads nested config entries as attributes of plain dicts, so no OmegaConf nodes
        return OmegaConf.to_container(arch, resolve=True) if OmegaConf.is_config(arch) else copy.deepcopy(dict(arch))
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise UserError(f"unknown OpenCLIP arch '{arch}'; known: {', '.join(open_clip.list_models())}")
    return cfg


class _ImagePreprocess(torch.nn.Module):
    """[-1, 1] images of any size -> 224x224 CLIP-normalised input (bicubic, antialiased, as official)."""

    def __init__(self, antialias=True, size=224):
        super().__init__()
        self.antialias = antialias
        self.size = size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def preprocess(self, x):
        import kornia  # deferred: only image conditioning needs it
        x = kornia.geometry.resize(x, (self.size, self.size), interpolation="bicubic", align_corners=True,
                                   antialias=self.antialias)
        x = (x + 1.) / 2.
        return kornia.enhance.normalize(x, self.mean, self.std)

    def drop(self, z, no_dropout):
        """Zero whole embeddings with probability ``ucg_rate`` (training-time unconditional guidance)."""
        if self.ucg_rate > 0. and not no_dropout:
            keep = torch.bernoulli((1. - self.ucg_rate) * torch.ones(z.shape[0], device=z.device))[:, None]
            z = keep * z
        return z


class FrozenOpenCLIPImageEmbedder(_ImagePreprocess, AbstractEncoder):
    """OpenCLIP image tower: ``forward(image)`` -> [B, embed_dim] (1024 for ViT-H-14).

    ``version`` (pretrained tag), ``device`` and ``max_length`` are kept for config compatibility;
    weights come from the checkpoint and inputs follow the weights' device.
    """

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77, freeze=True,
                 layer="pooled", antialias=True, ucg_rate=0.):
        super().__init__(antialias=antialias)
        if layer != "pooled":
            raise UserError(f"FrozenOpenCLIPImageEmbedder layer '{layer}' is not supported; use 'pooled'")
        import open_clip
        cfg = _model_config(arch)
        # The text transformer is deleted below, so it is built with one block instead of dozens.
        cfg["text_cfg"] = dict(cfg["text_cfg"], layers=1)
        self.model = open_clip.CLIP(**cfg)
        del self.model.transformer
        self.version = version
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.ucg_rate = ucg_rate
        if freeze:
            self.freeze()

    def forward(self, image, no_dropout=False):
        return self.drop(self.encode_with_vision_transformer(image), no_dropout)

    def encode_with_vision_transformer(self, img):
        img = self.preprocess(img.to(parameter_device(self.model)))
        return self.model.visual(img)

    def encode(self, image):
        return self(image)


class ClipImageEmbedder(_ImagePreprocess):
    """OpenAI CLIP image encoder: ``forward(image)`` -> [B, 768] for ViT-L/14.

    ``model`` is an OpenAI CLIP name ("ViT-L/14"); ``jit`` and ``device`` are kept for config
    compatibility. The output is cast to the input's dtype, as in the official module.
    """

    def __init__(self, model, jit=False, device="cpu", antialias=True, ucg_rate=0.):
        super().__init__(antialias=antialias)
        if model not in OPENAI_CLIP_ARCHS:
            raise UserError(f"ClipImageEmbedder model '{model}' is not one of {', '.join(OPENAI_CLIP_ARCHS)}")
        import open_clip
        self.model = open_clip.CLIP(**_model_config(OPENAI_CLIP_ARCHS[model]), quick_gelu=True)
        freeze_module(self.model)
        self.jit = jit
        self.device = device
        self.ucg_rate = ucg_rate

    def forward(self, x, no_dropout=False):
        out = self.model.encode_image(self.preprocess(x.to(parameter_device(self.model))))
        return self.drop(out.to(x.dtype), no_dropout)

    def encode(self, image):
        return self(image)
