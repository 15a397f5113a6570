"""SD 2.x text encoder: the text tower of an OpenCLIP model (ViT-H-14 for every SD 2.x release)."""
import copy

import torch
from omegaconf import OmegaConf

from ldm.errors import UserError
from ldm.modules.encoders.prompt_encoder import ChunkedTextEncoder
from ldm.modules.encoders.tokenizer import OPENCLIP_PAD_TOKEN_ID, CLIPBPETokenizer

# The image tower is deleted right after construction, so it is built at a token size: the full
# ViT-H-14 one would allocate and randomly initialise ~630M parameters only to throw them away.
_DISCARDED_VISION_CFG = dict(image_size=14, patch_size=14, width=64, layers=1, head_width=64)


def build_openclip_text_model(arch):
    """An ``open_clip.CLIP`` without its ``visual`` tower, from an open_clip architecture name or config dict.

    Built from the architecture config only: no pretrained tag is resolved, so nothing is downloaded.
    """
    import open_clip  # deferred: importing open_clip takes seconds

    if isinstance(arch, str):
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise UserError(f"unknown OpenCLIP arch '{arch}'; known: {', '.join(open_clip.list_models())}")
    elif OmegaConf.is_config(arch):
        # an arch written in a YAML config: open_clip reads nested entries of plain dicts only
        model_cfg = OmegaConf.to_container(arch, resolve=True)
    else:
        model_cfg = copy.deepcopy(dict(arch))
    if model_cfg.get("custom_text") or "hf_model_name" in model_cfg.get("text_cfg", {}):
        raise UserError(f"OpenCLIP arch '{arch}' has a custom or Hugging Face text tower; only the standard "
                        f"CLIP text transformer is supported")
    model_cfg["vision_cfg"] = dict(_DISCARDED_VISION_CFG)
    model = open_clip.CLIP(**model_cfg)
    del model.visual
    return model


class FrozenOpenCLIPEmbedder(ChunkedTextEncoder):
    """Prompts -> OpenCLIP text features ``[B, 77 * chunks, width]`` (1024 for ViT-H-14; SD 2.x conditioning).

    ``layer`` "last" runs every transformer block, "penultimate" stops one block early (what SD 2.x uses);
    both end with ``ln_final``. ``arch`` is an open_clip model name or a model config dict; ``version``
    (the pretrained tag) is accepted for config compatibility and ignored: weights come from the SD
    checkpoint. ``device`` is likewise kept but unused; inputs follow the weights' device.

    ``emphasis``, ``truncate`` and ``clip_skip`` are the prompt options of ``ChunkedTextEncoder``. Clip skip
    N counts from the configured ``layer``: N = 1 is that layer itself, N = 2 stops one more block early
    (for the SD 2.x configs' "penultimate", N = 2 is the output of the third-to-last block), always
    followed by ``ln_final``. (A1111 ignores its clip-skip setting for SD 2.x.)
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77, freeze=True,
                 layer="last", emphasis="none", clip_skip=1, truncate=True):
        super().__init__()
        if layer not in self.LAYERS:
            raise UserError(f"FrozenOpenCLIPEmbedder layer '{layer}' is not one of {', '.join(self.LAYERS)}")
        self.model = build_openclip_text_model(arch)
        context_length = self.model.positional_embedding.shape[0]
        if max_length != context_length:
            raise UserError(f"FrozenOpenCLIPEmbedder max_length={max_length} must equal the model's context length "
                            f"{context_length}")
        self.tokenizer = CLIPBPETokenizer(max_length, pad_token_id=OPENCLIP_PAD_TOKEN_ID, unescape_html=True)
        self.version = version
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]  # blocks skipped at the end
        self.init_prompt_options(emphasis, clip_skip, truncate)
        if freeze:
            self.freeze()

    def check_clip_skip(self, clip_skip):
        n_blocks = len(self.model.transformer.resblocks)
        if self.layer_idx + clip_skip - 1 >= n_blocks:
            raise UserError(f"clip_skip={clip_skip} with layer '{self.layer}' leaves none of this OpenCLIP text "
                            f"model's {n_blocks} blocks to run")

    def token_embedding_layer(self):
        return self.model.token_embedding

    def encode_tokens(self, tokens, clip_skip):
        return self.encode_with_transformer(tokens, skipped_blocks=self.layer_idx + clip_skip - 1)

    def encode_with_transformer(self, tokens, skipped_blocks=None):
        x = self.model.token_embedding(tokens) + self.model.positional_embedding  # [B, L, D]
        # Built here rather than taken from model.attn_mask: that buffer is not saved in checkpoints, so it
        # is garbage when the model was built on the meta device and then loaded.
        length = x.shape[1]
        causal_mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.text_transformer_forward(x, attn_mask=causal_mask, skipped_blocks=skipped_blocks)
        return self.model.ln_final(x)

    def text_transformer_forward(self, x, attn_mask=None, skipped_blocks=None):
        """Run all but the last ``skipped_blocks`` (default ``layer_idx``) residual blocks on ``x`` [B, L, D]."""
        skipped = self.layer_idx if skipped_blocks is None else skipped_blocks
        transformer = self.model.transformer
        blocks = transformer.resblocks[:len(transformer.resblocks) - skipped]
        batch_first = getattr(transformer, "batch_first", False)  # open_clip < 2.24 ran blocks as [L, B, D]
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=attn_mask)
        return x if batch_first else x.transpose(0, 1)
