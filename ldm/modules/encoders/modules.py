"""Conditioning encoders at their official import path (``ldm.modules.encoders.modules.*``).

Each encoder lives in a focused module; this file only gathers them under the names configs use.
"""
from ldm.modules.encoders.base import AbstractEncoder, IdentityEncoder
from ldm.modules.encoders.class_embedder import ClassEmbedder
from ldm.modules.encoders.clip_text import FrozenCLIPEmbedder
from ldm.modules.encoders.openclip_text import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPBPETokenizer
from ldm.modules.encoders.trainable_text import CLIPTokenTransformerEmbedder
from ldm.modules.freeze import disabled_train

__all__ = [
    "AbstractEncoder",
    "IdentityEncoder",
    "disabled_train",
    "ClassEmbedder",
    "FrozenCLIPEmbedder",
    "FrozenOpenCLIPEmbedder",
    "CLIPBPETokenizer",
    "CLIPTokenTransformerEmbedder",
]
from ldm.modules.encoders.image_embedders import ClipImageEmbedder, FrozenOpenCLIPImageEmbedder  # noqa: E402,F401
from ldm.modules.encoders.noise_aug import CLIPEmbeddingNoiseAugmentation  # noqa: E402,F401
