"""SD 1.x text encoder: OpenAI CLIP's text transformer in Hugging Face's ``CLIPTextModel`` layout."""
import logging

import torch

from ldm.errors import UserError
from ldm.modules.encoders.base import parameter_device
from ldm.modules.encoders.prompt_encoder import ChunkedTextEncoder
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


class FrozenCLIPEmbedder(ChunkedTextEncoder):
    """Prompts -> CLIP text features ``[B, 77 * chunks, hidden_size]`` (SD 1.x conditioning).

    ``layer``: "last" = final hidden states after the final LayerNorm; "pooled" = the end-token feature,
    ``[B, 1, hidden_size]``; "hidden" = ``hidden_states[layer_idx]`` (0 is the embedding output, no final
    LayerNorm). ``device`` is kept for config compatibility; inputs follow the weights' device.
    ``text_config`` overrides ``CLIPTextConfig`` fields (tests use it for tiny models).

    ``emphasis``, ``truncate`` and ``clip_skip`` are the prompt options of ``ChunkedTextEncoder``. Clip skip
    N, as in A1111: with layer "last", ``hidden_states[-N]`` through the final LayerNorm (N = 1 is the
    last layer itself, N = 2 the penultimate, ...); with layer "hidden", ``N - 1`` layers before
    ``layer_idx``. Layer "pooled" keeps the official behaviour: one feature per prompt from its first 75
    tokens, emphasis syntax not parsed, and clip skip refused.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version="openai/clip-vit-large-patch14", device="cuda", max_length=77, freeze=True,
                 layer="last", layer_idx=None, text_config=None, emphasis="none", clip_skip=1, truncate=True):
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
        self.init_prompt_options(emphasis, clip_skip, truncate)
        if freeze:
            self.freeze()

    def forward(self, text, emphasis=None, clip_skip=None, truncate=None):
        if self.layer != "pooled":
            return super().forward(text, emphasis=emphasis, clip_skip=clip_skip, truncate=truncate)
        self.prompt_options(emphasis, clip_skip, truncate)  # validates; clip skip is refused for "pooled"
        tokens = self.tokenizer(text).to(parameter_device(self.transformer))
        return self._run(tokens, output_hidden_states=False).pooler_output[:, None, :]

    def _run(self, tokens, output_hidden_states):
        # Explicit positions: the model's position_ids buffer is not saved in checkpoints, so it is
        # garbage when the model was built on the meta device and then loaded.
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return self.transformer(input_ids=tokens, position_ids=positions, output_hidden_states=output_hidden_states)

    def _hidden_state_index(self, clip_skip):
        """Index into ``hidden_states`` (0 = embedding output) for layer "last"/"hidden" and ``clip_skip``."""
        n_states = self.transformer.config.num_hidden_layers + 1
        configured = n_states - 1 if self.layer == "last" else self.layer_idx % n_states
        return configured - (clip_skip - 1)

    def check_clip_skip(self, clip_skip):
        if clip_skip == 1:
            return
        if self.layer == "pooled":
            raise UserError("clip_skip does not apply to FrozenCLIPEmbedder layer 'pooled' (the end-token feature of "
                            "the last layer); use clip_skip=1")
        if self._hidden_state_index(clip_skip) < 1:
            raise UserError(f"clip_skip={clip_skip} reaches past the first of this CLIP text model's "
                            f"{self.transformer.config.num_hidden_layers} layers")

    def token_embedding_layer(self):
        return self.transformer.text_model.embeddings.token_embedding

    def encode_tokens(self, tokens, clip_skip):
        out = self._run(tokens, output_hidden_states=self.layer == "hidden" or clip_skip > 1)
        if self.layer == "last" and clip_skip == 1:
            return out.last_hidden_state
        if self.layer == "last":
            return self.transformer.text_model.final_layer_norm(out.hidden_states[self._hidden_state_index(clip_skip)])
        if clip_skip == 1:
            return out.hidden_states[self.layer_idx]
        return out.hidden_states[self._hidden_state_index(clip_skip)]


def _drop_legacy_position_ids(module, state_dict, prefix, *args):
    # Safe to discard: forward passes explicit positions, which also sidesteps checkpoints whose
    # stored position_ids were corrupted by float rounding.
    if state_dict.pop(prefix + _LEGACY_POSITION_IDS_KEY, None) is not None:
        logger.debug("ignoring legacy key %s%s", prefix, _LEGACY_POSITION_IDS_KEY)
