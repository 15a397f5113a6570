"""Textual-inversion embeddings: the files people download, read into vectors, and the trigger words that use them.

An embedding is ``n`` learned input vectors ``[n, D]`` that stand in for one word of the prompt. Layouts read
here (``D`` is 768 for SD 1.x, 1024 for SD 2.x):

==================================  ===================================================================================
A1111 ``.pt``                       ``{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, D]}, "name", "step",
                                    "sd_checkpoint", "sd_checkpoint_name"}``; files of the original textual-inversion
                                    code pickle ``string_to_param`` as a ``torch.nn.ParameterDict`` (and the token as a
                                    tensor): that one class is rebuilt without running code from the file, any other
                                    class the pickle names is refused
kohya / A1111 ``.safetensors``      one tensor, ``{"emb_params": [n, D]}`` (A1111 takes any single-tensor file)
diffusers ``learned_embeds.bin``    ``{token: [D] or [n, D]}`` (``torch.save``; ``.safetensors`` alike); a bare
                                    tensor too
A1111 ``.png``                      a ``sd-ti-embedding`` text chunk: base64 of the JSON of the ``.pt`` dict, tensors
                                    written ``{"TORCHTENSOR": nested lists}``; without it, A1111's older encoding in
                                    the image's pixels (see ``_pixel_data``)
==================================  ===================================================================================

Refused by name: SDXL embeddings (``clip_l`` + ``clip_g``), files holding several embeddings, anything else.

Trigger words, as A1111 names them: the file's name without its suffix, whatever ``name`` a ``.pt`` holds; for
a PNG the ``name`` inside it (A1111 reads PNG embeddings by that name). A prompt uses an embedding where the
tokens of its trigger word appear (matched on token ids within one emphasis segment, longest trigger word
first): those tokens become a ``TokenRun`` of ``n`` placeholder tokens carrying the vectors and the segment's
emphasis weight, which chunking never splits (``ldm.modules.encoders.prompt_chunks``) and the text encoder
puts in place of the token embeddings before adding position embeddings (``prompt_encoder.embedding_overrides``).
"""
import base64
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.checkpoint import LoadReport, read_safetensors_file, read_torch_file
from ldm.errors import UserError
from ldm.modules.encoders.prompt_chunks import TokenRun

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png")
PNG_TEXT_KEY = "sd-ti-embedding"
PLACEHOLDER_TOKEN_ID = 0  # A1111's; the token embedding at an embedding's positions is replaced anyway
MAX_JSON_BYTES = 64 << 20  # an embedding's JSON is kilobytes; a bigger inflated stream is no embedding
SHOW = 5  # examples quoted in warnings
SUPPORTED = ("A1111 .pt (string_to_param), kohya/A1111 .safetensors (emb_params or one tensor), diffusers "
             "learned_embeds .bin/.safetensors ({token: tensor}), A1111 .png (sd-ti-embedding)")


@dataclass
class Embedding:
    """One textual-inversion embedding: its trigger word ``name``, ``vectors`` ``[n, D]`` (float32, CPU), the file
    it came from, and what A1111 records about its training (``step``, ``sd_checkpoint_name``; None if absent)."""
    name: str
    vectors: torch.Tensor
    source: str = "embedding"
    step: object = None
    sd_checkpoint_name: object = None

    @property
    def n_vectors(self):
        return self.vectors.shape[0]

    @property
    def width(self):
        return self.vectors.shape[1]


# ---------------------------------------------------------------------------------------------- one file
def read_embedding_file(path, name=None):
    """The :class:`Embedding` in the file at ``path`` (any layout of the module docstring), named ``name`` or by
    the file as A1111 names it. Raises UserError when the file holds no embedding read here."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embedding file '{path}' does not exist" if not path.exists() else
                        f"embedding file '{path}' is not a file; give the path to an embedding file")
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise UserError(f"embedding file '{path}' is not a {', '.join(EMBEDDING_SUFFIXES)} file; read here: "
                        f"{SUPPORTED}")
    embedding = _read(path, name)
    if embedding is None:
        raise UserError(f"image '{path}' holds no embedding (no {PNG_TEXT_KEY} text chunk, and no data in its pixels)")
    return embedding


def _read(path, name=None):
    """The embedding in ``path`` (suffix already checked), or None for a PNG that is only a picture."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        data = _png_data(path)
        if data is None:
            return None
        inner = data.get("name") if isinstance(data, dict) else None
        name = name or (inner if isinstance(inner, str) and inner.strip() else path.stem)
    elif suffix == ".safetensors":
        data = read_safetensors_file(path, "embedding file", torch_suffix=".pt")
    else:
        data = _read_torch(path)
    return embedding_from_data(data, name or path.stem, source=str(path))


def embedding_from_data(data, name, source="embedding"):
    """``data`` as a file holds it (a dict in a layout of the module docstring, or a tensor) -> :class:`Embedding`."""
    if isinstance(data, torch.Tensor):
        tensor = data
    elif not isinstance(data, dict) or not data:
        raise UserError(f"embedding file '{source}' holds {_describe(data)}, not an embedding; read here: {SUPPORTED}")
    elif "string_to_param" in data:
        # the original textual-inversion code saved an nn.ParameterDict; its tensors are in _parameters
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"embedding file '{source}' holds {_describe(params)} in string_to_param; an A1111 "
                            f"embedding holds exactly one ('*')")
        tensor = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        raise UserError(f"embedding file '{source}' is an SDXL embedding (clip_l and clip_g vectors); SDXL is not "
                        f"supported here, only SD 1.x / 2.x embeddings")
    elif len(data) == 1:
        tensor = next(iter(data.values()))
    else:
        keys = ", ".join(repr(k) for k in list(data)[:SHOW])
        raise UserError(f"embedding file '{source}' holds {len(data)} entries ({keys}); an embedding file holds one "
                        f"tensor or A1111's string_to_param; read here: {SUPPORTED}")
    return Embedding(name, _checked_vectors(tensor, source), source, step=_plain(data, "step"),
                     sd_checkpoint_name=_plain(data, "sd_checkpoint_name"))


def _checked_vectors(tensor, source):
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"embedding file '{source}' holds {_describe(tensor)} where its vectors should be")
    if tensor.ndim == 1:
        tensor = tensor[None]  # diffusers saves a one-vector embedding as [D]
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise UserError(f"embedding file '{source}' holds a tensor of shape {list(tensor.shape)}; embedding vectors "
                        f"are [n, D] or [D]")
    if not tensor.is_floating_point():
        raise UserError(f"embedding file '{source}' holds {tensor.dtype} values where its vectors should be")
    if not torch.isfinite(tensor).all():
        raise UserError(f"embedding file '{source}' has NaN or infinite values in its vectors; the file is corrupt")
    return tensor.detach().to("cpu", torch.float32).contiguous()


def _plain(data, key):
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, (str, int)) else None


def _describe(obj):
    if isinstance(obj, dict):
        return f"{len(obj)} entries" if obj else "nothing"
    return f"a {type(obj).__name__}"


def _read_torch(path):
    # A ParameterDict is rebuilt from its pickled attributes (no constructor or method of the file's choosing
    # runs), so it can join the tensors and plain containers weights_only allows; any other class is refused
    # by read_torch_file, naming it.
    with torch.serialization.safe_globals([torch.nn.ParameterDict]):
        return read_torch_file(path, "embedding file")


# ---------------------------------------------------------------------------------------------- A1111 PNGs
def _png_data(path):
    """The embedding data of an A1111 PNG: its ``sd-ti-embedding`` text chunk, else its pixel encoding; None
    when it has neither (a preview picture)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are read with it
            text = getattr(image, "text", {}).get(PNG_TEXT_KEY)
            if text is None:
                return _pixel_data(image)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"embedding image '{path}' is not a readable PNG ({err})") from None
    try:
        return json.loads(base64.b64decode(text), object_hook=_json_tensors)
    except (ValueError, TypeError) as err:  # bad base64 or JSON, or "tensors" that are not rectangular numbers
        raise UserError(f"embedding image '{path}': its {PNG_TEXT_KEY} text is not A1111's base64 JSON ({err}); "
                        f"the file is corrupt") from None


def _json_tensors(obj):
    """A1111 writes each tensor as ``{"TORCHTENSOR": nested lists}`` and reads it back as float64."""
    if "TORCHTENSOR" in obj:
        return torch.from_numpy(np.asarray(obj["TORCHTENSOR"], dtype=np.float64))
    return obj


def _pixel_data(image):
    """A1111's first PNG encoding: the zlib-compressed JSON, its bytes split into low and high nibbles, each
    nibble block xor-ed with a fixed key and stored in the low 4 bits of the pixels of two strips, left and right
    of the picture and each separated from it by a black column (the high bits only draw a pattern). Returns
    None when the image holds no such data."""
    pixels = _crop_black(np.asarray(image.convert("RGB"))) & 0x0F  # [H, W, 3]
    black = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)  # columns whose low bits are all 0
    if len(black) < 2:
        return None
    low, high = _unkey(pixels[:, :black.min()]), _unkey(pixels[:, black.max() + 1:])
    if low.shape != high.shape or low.size == 0:
        return None
    inflater = zlib.decompressobj()
    try:
        # the strips repeat the stream to fill their last column; what follows the stream's end is unused
        raw = inflater.decompress(((high << 4) | low).tobytes(), MAX_JSON_BYTES)
        if not inflater.eof:
            return None
        data = json.loads(raw, object_hook=_json_tensors)
    except (zlib.error, ValueError, TypeError):  # black columns in an ordinary picture
        return None
    return data if isinstance(data, dict) else None


def _crop_black(pixels):
    """``pixels`` cut to the bounding box of the pixels with no channel at 0 (the whole image if none)."""
    lit = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if len(rows) == 0:
        return pixels
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _unkey(block):
    """Undo the xor of a strip's nibbles with A1111's key (its ``lcg`` restarted for each strip)."""
    return block.astype(np.uint8) ^ (lcg_key(block.size).reshape(block.shape) & 0x0F)


def lcg_key(n):
    """The first ``n`` numbers of A1111's key: ``s_k = (1664525 s_(k-1) + 1013904223) mod 2**32`` from ``s_0 = 0``,
    each taken mod 255."""
    key = np.empty(n, dtype=np.uint8)
    seed = 0
    for i in range(n):
        seed = (1664525 * seed + 1013904223) & 0xFFFFFFFF
        key[i] = seed % 255
    return key


# ---------------------------------------------------------------------------------------------- a folder
@dataclass
class EmbeddingSet:
    """Embeddings by trigger word, and the trigger words that cannot be used with the reason why.

    ``skipped`` lists the files that hold no embedding (preview pictures, empty files); ``refused`` trigger words
    are refused when a prompt uses them, so that a folder shared by several models still serves the others.
    """
    embeddings: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)


def load_embeddings(directory):
    """Every embedding file in ``directory`` and its subfolders (``EMBEDDING_SUFFIXES``; A1111's ``*.preview.png``
    pictures and empty files skipped), as an :class:`EmbeddingSet`. A file that cannot be read, or two files with
    one trigger word, make that trigger word refused (logged now, an error when a prompt uses it)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"embeddings directory '{directory}' does not exist or is not a directory")
    found = EmbeddingSet()
    sources = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES):
        if path.stat().st_size == 0 or path.name.lower().endswith(".preview.png"):
            found.skipped.append(str(path))
            continue
        try:
            embedding = _read(path)
        except UserError as err:
            found.refused[path.stem] = str(err)
            sources.setdefault(path.stem, []).append(str(path))
            continue
        if embedding is None:
            found.skipped.append(str(path))
            continue
        found.embeddings[embedding.name] = embedding
        sources.setdefault(embedding.name, []).append(str(path))
    for name, paths in sources.items():
        if len(paths) > 1:
            found.embeddings.pop(name, None)
            found.refused[name] = f"several files give the trigger word '{name}' ({', '.join(paths)}); keep one"
    if found.skipped:
        log.info("embeddings: %d files in %s hold no embedding, e.g. %s", len(found.skipped), directory,
                 ", ".join(found.skipped[:SHOW]))
    return found


# ---------------------------------------------------------------------------------------------- prompts
class PromptEmbeddings:
    """The embeddings of an :class:`EmbeddingSet` as one text encoder reads prompts with them.

    ``tokenizer`` turns trigger words into the token ids matched in prompts; ``width`` is the encoder's token
    embedding width: an embedding of another width is refused by name when a prompt uses it. ``report`` is an
    :class:`ldm.checkpoint.LoadReport`: ``loaded`` embeddings, ``ignored`` files without one, ``unexpected`` refused
    trigger words, ``mismatched`` (name, its vectors' shape, the shape this encoder takes).
    """

    def __init__(self, embeddings, tokenizer, width):
        self.width = width
        self.embeddings = {}
        self.refused = dict(embeddings.refused)
        mismatched = []
        for name, embedding in embeddings.embeddings.items():
            if embedding.width == width:
                self.embeddings[name] = embedding
                continue
            self.refused[name] = (f"'{embedding.source}' has {embedding.width}-wide vectors, but this text encoder's "
                                  f"token embeddings are {width} wide{_family_hint(embedding.width, width)}")
            mismatched.append((name, list(embedding.vectors.shape), [embedding.n_vectors, width]))
        self._candidates = {}  # first token id -> [(token ids, trigger word)], longest first
        owners = {}
        for name in [*self.embeddings, *self.refused]:
            ids = tuple(tokenizer.encode(name))
            if not ids:
                log.warning("embedding '%s' is not usable: its trigger word has no tokens", name)
                continue
            if ids in owners:
                self._refuse_both(owners[ids], name)
                continue
            owners[ids] = name
            self._candidates.setdefault(ids[0], []).append((ids, name))
        for candidates in self._candidates.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)
        self.report = LoadReport(loaded=len(self.embeddings), ignored=list(embeddings.skipped),
                                 unexpected=sorted(self.refused), mismatched=mismatched)
        if self.refused:
            log.warning("%d embeddings cannot be used with this model (an error if a prompt uses them): %s",
                        len(self.refused), "; ".join(f"{n}: {why}" for n, why in list(self.refused.items())[:SHOW]))
        log.info("textual-inversion embeddings: %s", ", ".join(sorted(self.embeddings)) or "none")

    def _refuse_both(self, first, second):
        why = f"'{first}' and '{second}' are the same trigger word to the tokenizer; rename one file"
        for name in (first, second):
            self.embeddings.pop(name, None)
            self.refused[name] = why

    def runs(self, token_ids, weight=1.0):
        """The token ids of one prompt segment -> ``TokenRun``s with emphasis ``weight``: each trigger word becomes
        a run of ``n`` placeholder tokens carrying its ``n`` vectors; the tokens between stay plain runs."""
        runs, plain, i = [], [], 0
        while i < len(token_ids):
            match = next((c for c in self._candidates.get(token_ids[i], ())
                          if tuple(token_ids[i:i + len(c[0])]) == c[0]), None)
            if match is None:
                plain.append(token_ids[i])
                i += 1
                continue
            ids, name = match
            if name not in self.embeddings:
                why = self.refused.get(name, "it was refused")
                raise UserError(f"the prompt uses the embedding '{name}', which cannot be used: {why}")
            if plain:
                runs.append(TokenRun(plain, weight))
                plain = []
            vectors = self.embeddings[name].vectors
            runs.append(TokenRun([PLACEHOLDER_TOKEN_ID] * len(vectors), weight, vectors))
            i += len(ids)
        if plain or not runs:
            runs.append(TokenRun(plain, weight))
        return runs


def _family_hint(a, b):
    if {a, b} == {768, 1024}:
        return " (SD 1.x embeddings are 768 wide, SD 2.x 1024: it was made for the other family)"
    return ""


def use_embeddings(model, embeddings):
    """Make the text encoder of ``model`` (a latent diffusion model, or the encoder itself) read prompts with
    ``embeddings``: a directory (:func:`load_embeddings`), an :class:`EmbeddingSet`, or None to stop using any.
    Every later prompt of ``ldm.generate`` sees them. Returns the :class:`PromptEmbeddings` in use (or None)."""
    from ldm.modules.encoders.prompt_encoder import ChunkedTextEncoder
    encoder = model if isinstance(model, ChunkedTextEncoder) else getattr(model, "cond_stage_model", None)
    if not isinstance(encoder, ChunkedTextEncoder):
        raise UserError(f"textual-inversion embeddings need a prompt text encoder; this model's conditioning is "
                        f"{type(encoder).__name__}")
    if embeddings is None:
        encoder.embeddings = None
        return None
    if not isinstance(embeddings, EmbeddingSet):
        embeddings = load_embeddings(embeddings)
    table = PromptEmbeddings(embeddings, encoder.tokenizer, encoder.token_embedding_layer().weight.shape[-1])
    encoder.embeddings = table
    return table
