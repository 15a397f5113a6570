"""Prompts -> chunks of CLIP tokens with per-token emphasis weights, as the AUTOMATIC1111 web UI splits them.

A CLIP text encoder sees at most 75 prompt tokens (77 with the start and end tokens). A longer prompt is
cut into 75-token chunks; each chunk is encoded alone, with its own start/end tokens and padding, and the
outputs are concatenated along the token axis (``ChunkedTextEncoder``). A chunk that fills up within
``COMMA_BACKTRACK`` tokens after a comma ends at that comma instead, and the words after the comma start
the next chunk, so that a phrase is not split between chunks. ``BREAK`` ends a chunk early.

Textual-inversion embeddings: given ``embeddings`` (``ldm.modules.encoders.embeddings.PromptEmbeddings``),
each trigger word in a prompt becomes a ``TokenRun`` whose ``vectors`` replace its tokens' input embeddings;
such a run is never split across chunks, and the chunk records it as an ``EmbeddingOverride`` at its token
positions.
"""
import logging
from dataclasses import dataclass, field

from ldm.errors import UserError
from ldm.modules.encoders.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, load_bpe
from ldm.modules.prompt_parser import parse_prompt_segments

logger = logging.getLogger(__name__)

COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
EMPHASIS_MODES = ("none", "original", "no-norm")


def comma_token_id():
    """Id of a lone "," word in the CLIP BPE vocabulary."""
    return load_bpe()[0][",</w>"]


@dataclass
class TokenRun:
    """Consecutive prompt tokens that share one emphasis ``weight``.

    ``vectors`` (a ``[len(token_ids), D]`` tensor), when given, replaces these tokens' input embeddings
    (a textual-inversion embedding; ``token_ids`` are then placeholders); such a run is kept in one chunk.
    """
    token_ids: list
    weight: float = 1.0
    vectors: object = None


class ChunkBreak:
    """Ends the current chunk (the prompt's ``BREAK``)."""


CHUNK_BREAK = ChunkBreak()


@dataclass
class EmbeddingOverride:
    """Input-embedding vectors ``[n, D]`` to place at token positions ``position .. position + n - 1`` of a chunk."""
    position: int
    vectors: object


@dataclass
class PromptChunk:
    """One encoder input: ``token_ids`` = start, up to ``chunk_length`` prompt tokens, end, padding.

    ``weights`` has one emphasis weight per token (1.0 on start, end and padding); ``overrides`` are
    positions in ``token_ids`` whose input embeddings are replaced.
    """
    token_ids: list
    weights: list
    overrides: list = field(default_factory=list)


@dataclass
class _Content:
    """The prompt tokens of a chunk being filled (no start, end or padding yet)."""
    token_ids: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    overrides: list = field(default_factory=list)  # EmbeddingOverride, positions within token_ids

    def split_at(self, cut):
        """Keep tokens before ``cut``; return the rest (with its overrides) as new content."""
        rest = _Content(self.token_ids[cut:], self.weights[cut:],
                        [EmbeddingOverride(o.position - cut, o.vectors) for o in self.overrides if o.position >= cut])
        self.overrides = [o for o in self.overrides if o.position < cut]
        del self.token_ids[cut:], self.weights[cut:]
        return rest


def prompt_runs(text, tokenizer, emphasis="original", embeddings=None):
    """``text`` -> ``TokenRun``s and ``CHUNK_BREAK``s. With emphasis "none" the text is taken literally.

    Each emphasis segment is tokenized alone, as A1111 does (so ``(fe)male`` is "fe" + "male"); trigger words
    of ``embeddings`` are found within a segment and take its weight (in every emphasis mode, as in A1111).
    """
    check_emphasis(emphasis)

    def runs(token_ids, weight=1.0):
        return [TokenRun(token_ids, weight)] if embeddings is None else embeddings.runs(token_ids, weight)

    if emphasis == "none":
        return runs(tokenizer.encode(text))
    return [item for segment in parse_prompt_segments(text)
            for item in ([CHUNK_BREAK] if segment.is_break else runs(tokenizer.encode(segment.text), segment.weight))]


def split_into_chunks(runs, chunk_length=75, comma_id=None, comma_backtrack=COMMA_BACKTRACK):
    """``TokenRun``s / ``CHUNK_BREAK``s -> list of chunk contents (``_Content``), at least one.

    A1111's rule: when a chunk is full and the next token is not a comma, and the chunk's last comma is
    at most ``comma_backtrack`` tokens from its end, the tokens after that comma move to the next chunk.
    ``comma_backtrack=0`` cuts every chunk at exactly ``chunk_length`` tokens.
    """
    comma_id = comma_token_id() if comma_id is None else comma_id
    chunks = []
    content = _Content()
    last_comma = -1

    def close():
        nonlocal content, last_comma
        chunks.append(content)
        content, last_comma = _Content(), -1

    def make_room():
        """Before placing a non-comma token: close a full chunk, at its last comma when that is near."""
        nonlocal content
        full = len(content.token_ids) == chunk_length
        if full and comma_backtrack and last_comma != -1 and chunk_length - last_comma <= comma_backtrack:
            rest = content.split_at(last_comma + 1)
            close()
            content = rest
        elif full:
            close()

    for run in runs:
        if run is CHUNK_BREAK:
            close()
            continue
        if run.vectors is not None:
            n = len(run.token_ids)
            if n > chunk_length:
                raise UserError(f"an embedding of {n} vectors does not fit in a {chunk_length}-token prompt chunk")
            make_room()
            if len(content.token_ids) + n > chunk_length:
                close()
            content.overrides.append(EmbeddingOverride(len(content.token_ids), run.vectors))
            content.token_ids.extend(run.token_ids)
            content.weights.extend([run.weight] * n)
            continue
        for token in run.token_ids:
            if token == comma_id:
                last_comma = len(content.token_ids)
                if last_comma == chunk_length:
                    close()  # a comma after a full chunk opens the next one (and does not count there)
            else:
                make_room()
            content.token_ids.append(token)
            content.weights.append(run.weight)
    if content.token_ids or not chunks:
        close()
    return chunks


def finish_chunk(content, chunk_length=75, pad_token_id=EOS_TOKEN_ID):
    """Chunk content -> ``PromptChunk`` of ``chunk_length + 2`` tokens: start, content, end, padding."""
    padding = chunk_length - len(content.token_ids)
    return PromptChunk(
        token_ids=[BOS_TOKEN_ID, *content.token_ids, EOS_TOKEN_ID] + [pad_token_id] * padding,
        weights=[1.0, *content.weights, 1.0] + [1.0] * padding,
        overrides=[EmbeddingOverride(o.position + 1, o.vectors) for o in content.overrides],  # +1: start token
    )


def empty_chunk(chunk_length=75, pad_token_id=EOS_TOKEN_ID):
    """The chunk of an empty prompt, used to pad a batch's shorter prompts to the same number of chunks."""
    return finish_chunk(_Content(), chunk_length, pad_token_id)


def chunk_prompt(text, tokenizer, emphasis="original", truncate=False, embeddings=None):
    """``text`` -> list of ``PromptChunk``s for ``tokenizer`` (a ``CLIPBPETokenizer``), with the textual-inversion
    ``embeddings`` (a ``PromptEmbeddings``) if given.

    ``truncate=True`` keeps the official behaviour: one chunk holding the first ``max_length - 2`` tokens
    (no comma backtracking; whatever follows, including anything after a BREAK, is dropped and logged).
    """
    chunk_length = tokenizer.max_length - 2
    runs = prompt_runs(text, tokenizer, emphasis, embeddings)
    contents = split_into_chunks(runs, chunk_length, comma_backtrack=0 if truncate else COMMA_BACKTRACK)
    if truncate and len(contents) > 1:
        dropped = sum(len(c.token_ids) for c in contents[1:])
        logger.info("prompt truncated to its first %d tokens (%d dropped): %.60r", chunk_length, dropped, text)
        contents = contents[:1]
    return [finish_chunk(c, chunk_length, tokenizer.pad_token_id) for c in contents]


def check_emphasis(emphasis):
    if emphasis not in EMPHASIS_MODES:
        raise UserError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}; got {emphasis!r}")
