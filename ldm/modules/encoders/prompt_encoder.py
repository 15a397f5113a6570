"""What the text encoders share: prompts -> chunks -> encoder -> emphasis -> chunks concatenated.

``ChunkedTextEncoder`` is the base of ``FrozenCLIPEmbedder`` (SD 1.x), ``FrozenOpenCLIPEmbedder`` (SD 2.x)
and ``CLIPTokenTransformerEmbedder`` (the shipped model). Its prompt options are constructor arguments,
attributes, and per-call overrides of ``encode`` / ``forward``:

``emphasis``   "original" (default): the A1111 syntax is parsed, each token's output feature is multiplied by
               its weight and the prompt's mean feature value is restored; "no-norm": weighted, mean not
               restored; "none": the prompt is taken literally (brackets are text, BREAK is a word).
``truncate``   False (default): prompts of any length, in 75-token chunks, output ``[B, 77 * chunks, D]``;
               True: the official behaviour, the first 75 tokens only, output ``[B, 77, D]``.
``clip_skip``  1 (default): the encoder's configured layer; N: N - 1 layers earlier (see each encoder).

A prompt without emphasis syntax that fits in 75 tokens gives exactly the official conditioning: the
same tokens, the same encoder call, and rows whose weights are all 1 are returned untouched.
"""
import contextlib
from dataclasses import dataclass

import torch

from ldm.errors import UserError
from ldm.modules.encoders.base import AbstractEncoder, parameter_device
from ldm.modules.encoders.prompt_chunks import check_emphasis, chunk_prompt, empty_chunk


def apply_emphasis(z, weights, emphasis):
    """Emphasis weights ``[B, L]`` applied to encoder output ``z`` ``[B, L, D]``.

    "original" rescales each weighted row so that its mean over tokens and channels is what it was
    before weighting (A1111 takes that mean over the whole batch; per row, a prompt's conditioning
    does not depend on the other prompts of its batch). Rows whose weights are all 1 are returned
    as they are, bit for bit.
    """
    check_emphasis(emphasis)
    weighted_rows = (weights != 1).any(dim=1)  # [B]
    if emphasis == "none" or not weighted_rows.any():
        return z
    weighted = z * weights[..., None]  # [B, L, D]
    if emphasis == "original":
        old_mean = z.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1]
        new_mean = weighted.mean(dim=(1, 2), keepdim=True)
        # a row whose weighted mean is exactly 0 cannot be rescaled; it stays weighted only
        safe_mean = torch.where(new_mean == 0, torch.ones_like(new_mean), new_mean)
        weighted = weighted * torch.where(new_mean == 0, torch.ones_like(new_mean), old_mean / safe_mean)
    return torch.where(weighted_rows[:, None, None], weighted, z)


@contextlib.contextmanager
def embedding_overrides(token_embedding, overrides_per_row):
    """While active, ``token_embedding``'s output rows take the ``EmbeddingOverride`` vectors of each batch row."""
    if not any(overrides_per_row):
        yield
        return

    def place(module, inputs, output):
        output = output.clone()
        for row, overrides in enumerate(overrides_per_row):
            for override in overrides:
                vectors = torch.as_tensor(override.vectors)
                if vectors.ndim != 2 or vectors.shape[1] != output.shape[-1]:
                    raise UserError(f"embedding vectors of shape {tuple(vectors.shape)} do not fit this text encoder's "
                                    f"{output.shape[-1]}-wide token embeddings")
                output[row, override.position:override.position + vectors.shape[0]] = vectors.to(output)
        return output

    handle = token_embedding.register_forward_hook(place)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class PromptOptions:
    emphasis: str
    clip_skip: int
    truncate: bool


class ChunkedTextEncoder(AbstractEncoder):
    """Base of the text encoders that take A1111-style prompts (see the module docstring).

    The defaults are the official behaviour (no emphasis, cut at 75 tokens), so training and the
    official code paths see what they always saw; the generation API (``ldm.generate``) asks for
    A1111's behaviour (``emphasis="original"``, ``truncate=False``) per call.

    A subclass sets ``self.tokenizer`` (a ``CLIPBPETokenizer``), calls ``init_prompt_options`` and implements
    ``encode_tokens(tokens, clip_skip)`` (``[B, L]`` ids -> ``[B, L, D]``), ``token_embedding_layer()`` and
    ``check_clip_skip(clip_skip)``.

    ``embeddings``: the textual-inversion embeddings prompts are read with (a ``PromptEmbeddings``, set by
    ``ldm.modules.encoders.embeddings.use_embeddings``); None reads no trigger words. Not part of the state dict.
    """

    embeddings = None

    def init_prompt_options(self, emphasis="none", clip_skip=1, truncate=True):
        options = self.prompt_options(emphasis, clip_skip, truncate)
        self.emphasis, self.clip_skip, self.truncate = options.emphasis, options.clip_skip, options.truncate

    def prompt_options(self, emphasis=None, clip_skip=None, truncate=None):
        """Validated options: the given ones, else the encoder's attributes."""
        emphasis = self.emphasis if emphasis is None else emphasis
        clip_skip = self.clip_skip if clip_skip is None else clip_skip
        truncate = self.truncate if truncate is None else truncate
        check_emphasis(emphasis)
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise UserError(f"clip_skip must be an integer >= 1 (1 = the configured layer), got {clip_skip!r}")
        self.check_clip_skip(clip_skip)
        if not isinstance(truncate, bool):
            raise UserError(f"truncate must be True or False, got {truncate!r}")
        return PromptOptions(emphasis, clip_skip, truncate)

    def check_clip_skip(self, clip_skip):
        raise NotImplementedError

    def token_embedding_layer(self):
        raise NotImplementedError

    def encode_tokens(self, tokens, clip_skip):
        raise NotImplementedError

    def forward(self, text, emphasis=None, clip_skip=None, truncate=None):
        """Prompt(s) -> ``[B, 77 * chunks, D]``; every prompt of the batch is padded to the same number of
        chunks with empty-prompt chunks."""
        options = self.prompt_options(emphasis, clip_skip, truncate)
        texts = [text] if isinstance(text, str) else list(text)
        chunked = [chunk_prompt(t, self.tokenizer, options.emphasis, options.truncate, self.embeddings) for t in texts]
        pad = empty_chunk(self.tokenizer.max_length - 2, self.tokenizer.pad_token_id)
        device = parameter_device(self)
        outputs = []
        for i in range(max((len(chunks) for chunks in chunked), default=1)):
            batch = [chunks[i] if i < len(chunks) else pad for chunks in chunked]
            tokens = torch.tensor([c.token_ids for c in batch], dtype=torch.long, device=device)
            tokens = tokens.reshape(len(batch), self.tokenizer.max_length)  # [B, 77] even for an empty batch
            with embedding_overrides(self.token_embedding_layer(), [c.overrides for c in batch]):
                z = self.encode_tokens(tokens, options.clip_skip)  # [B, 77, D]
            weights = torch.tensor([c.weights for c in batch], dtype=z.dtype, device=z.device)
            outputs.append(apply_emphasis(z, weights.reshape(tokens.shape), options.emphasis))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def encode(self, text, **prompt_options):
        return self(text, **prompt_options)
