"""SD 1.x text encoder: OpenAI CLIP's text transformer in Hugging Face's ``CLIPTextModel`` layout."""
import logging

import torch

from ldm.errors import UserError
from ldm.modules.encoders.base import AbstractEncoder, parameter_device
from ldm.modules.encoders.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, CLIPBPETokenizer

logger = logging.getLogger(__name__)

# Text-tower hyper-parameters of the OpenAI CLIP releases, keyed by their Hugging Face names. The name
# only picks the architecture; weights always come from the Stable Diffusion checkpoint.
_VIT_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768)
_VIT_B_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                   projection_dim=512)
CLIP_TEXT_VERSIONS = {
    "openai/clip-vit-large-patch14": _VIT_L_TEXT,
    "openai/clip-vit-large-patch14-336": _VIT_L_TEXT,
    "openai/clip-vit-base-patch32": _VIT_B_TEXT,
    "openai/clip-vit-base-patch16": _VIT_B_TEXT,
}

# Saved by transformers < 4.31 and so present in every released SD 1.x checkpoint; no longer a model key.
_LEGACY_POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"

_SHARED_TEXT = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=1)


def clip_text_config(version, overrides=None):
    """``transformers.CLIPTextConfig`` for a known CLIP ``version``, with optional field overrides."""
    from transformers import CLIPTextConfig  # deferred: importing transformers takes seconds

    if version not in CLIP_TEXT_VERSIONS:
        raise UserError(f"unknown CLIP text version '{version}'; known: {', '.join(sorted(CLIP_TEXT_VERSIONS))}")
    return CLIPTextConfig(**{**_SHARED_TEXT, **CLIP_TEXT_VERSIONS[version], **(overrides or {})})


class FrozenCLIPEmbedder(AbstractEncoder):
    """Prompts -> CLIP text features ``[B, max_length, hidden_size]`` (SD 1.x conditioning).

    ``layer``: "last" = final hidden states after the final LayerNorm; "pooled" = the end-token feature,
    ``[B, 1, hidden_size]``; "hidden" = ``hidden_states[layer_idx]`` (0 is the embedding output, no final
    LayerNorm). ``device`` is kept for config compatibility; inputs follow the weights' device.
    ``text_config`` overrides ``CLIPTextConfig`` fields (tests use it for tiny models).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version="openai/clip-vit-large-patch14", device="cuda", max_length=77, freeze=True,
                 layer="last", layer_idx=None, text_config=None):
        super().__init__()
        from transformers import CLIPTextModel

        if layer not in self.LAYERS:
            raise UserError(f"FrozenCLIPEmbedder layer '{layer}' is not one of {', '.join(self.LAYERS)}")
        config = clip_text_config(version, text_config)
        if layer == "hidden" and (layer_idx is None or abs(layer_idx) > config.num_hidden_layers):
            raise UserError(f"FrozenCLIPEmbedder layer 'hidden' needs layer_idx in "
                            f"[-{config.num_hidden_layers}, {config.num_hidden_layers}], got {layer_idx}")
        if max_length > config.max_position_embeddings:
            raise UserError(f"FrozenCLIPEmbedder max_length={max_length} exceeds the model's "
                            f"{config.max_position_embeddings} positions")
        self.transformer = CLIPTextModel(config)
        self.register_load_state_dict_pre_hook(_drop_legacy_position_ids)
        self.tokenizer = CLIPBPETokenizer(max_length, pad_token_id=EOS_TOKEN_ID)
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if freeze:
            self.freeze()

    def forward(self, text):
        tokens = self.tokenizer(text).to(parameter_device(self.transformer))
        # Explicit positions: the model's position_ids buffer is not saved in checkpoints, so it is
        # garbage when the model was built on the meta device and then loaded.
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        out = self.transformer(input_ids=tokens, position_ids=positions, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]

    def encode(self, text):
        return self(text)


def _drop_legacy_position_ids(module, state_dict, prefix, *args):
    # Safe to discard: forward passes explicit positions, which also sidesteps checkpoints whose
    # stored position_ids were corrupted by float rounding.
    if state_dict.pop(prefix + _LEGACY_POSITION_IDS_KEY, None) is not None:
        logger.debug("ignoring legacy key %s%s", prefix, _LEGACY_POSITION_IDS_KEY)
