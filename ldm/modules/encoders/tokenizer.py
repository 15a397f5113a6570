"""Offline CLIP byte-pair tokenizer over the vocabulary file bundled with open_clip.

SD 1.x tokenizes with Hugging Face's ``CLIPTokenizer`` and SD 2.x with ``open_clip.tokenize``. Both use
the same 49408-token BPE vocabulary and produce ``<start> + up to (max_length - 2) tokens + <end>``;
they differ only in the padding id (49407 vs 0) and in open_clip un-escaping HTML entities first.
"""
import functools
import gzip
import html
import importlib.util
import os

import ftfy
import regex
import torch

from ldm.errors import UserError

BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>; SD 1.x also pads with it
OPENCLIP_PAD_TOKEN_ID = 0
VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2  # the vocabulary keeps only the first merges of the file
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

# Words are letter runs, single digits, punctuation runs and English contractions; the special tokens
# are matched whole so a prompt containing them maps to their ids, as both reference tokenizers do.
_WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def _bpe_file():
    # find_spec locates the package without importing it (importing open_clip takes seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary: pip install open_clip_torch")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise UserError(f"CLIP BPE vocabulary not found at {path}; reinstall open_clip_torch")
    return path


@functools.lru_cache(maxsize=None)
def byte_symbols():
    """Map each byte to a printable character, so BPE never sees whitespace or control characters.

    Printable Latin-1 bytes stand for themselves; the remaining 68 bytes take code points 256, 257, ...
    in byte order. The dict order (printable first) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


@functools.lru_cache(maxsize=None)
def load_bpe():
    """Return ``(vocab, merge_ranks)``: symbol -> id, and symbol pair -> merge priority (lower first)."""
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]  # line 0 is a version header
    singles = list(byte_symbols().values())
    symbols = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges] + list(_SPECIAL_TOKENS)
    vocab = {s: i for i, s in enumerate(symbols)}
    if len(vocab) != VOCAB_SIZE:
        raise UserError(f"CLIP BPE vocabulary {_bpe_file()} gives {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, {m: rank for rank, m in enumerate(merges)}


def _bpe_merge(symbols, ranks):
    """Merge the adjacent pair with the best rank, everywhere left to right, until no pair is known."""
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@functools.lru_cache(maxsize=1 << 16)
def _word_ids(word):
    vocab, ranks = load_bpe()
    if word in _SPECIAL_TOKENS:
        return (vocab[word],)
    table = byte_symbols()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += "</w>"  # marks the end of a word, so "cat" and the "cat" in "cats" differ
    return tuple(vocab[s] for s in _bpe_merge(chars, ranks))


class CLIPBPETokenizer:
    """Text -> ``LongTensor[B, max_length]`` of CLIP token ids, fully offline.

    ``pad_token_id`` 49407 with ``unescape_html=False`` reproduces Hugging Face's CLIPTokenizer (SD 1.x,
    padding="max_length", truncation=True); 0 with ``unescape_html=True`` reproduces ``open_clip.tokenize``
    (SD 2.x). Overlong prompts keep their first ``max_length - 2`` tokens.
    """

    def __init__(self, max_length=77, pad_token_id=EOS_TOKEN_ID, unescape_html=False):
        if max_length < 2:
            raise UserError(f"tokenizer max_length={max_length} leaves no room for the start and end tokens; use >= 2")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.unescape_html = unescape_html

    def clean(self, text):
        text = ftfy.fix_text(text)
        if self.unescape_html:
            text = html.unescape(html.unescape(text))  # twice: captions are often escaped twice
        return " ".join(text.split()).lower()

    def encode(self, text):
        """Token ids of ``text`` without start/end tokens, padding or truncation."""
        ids = []
        for word in _WORD_PATTERN.findall(self.clean(text)):
            ids.extend(_word_ids(word))
        return ids

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        tokens = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS_TOKEN_ID, *self.encode(text)[:self.max_length - 2], EOS_TOKEN_ID]
            tokens[row, :len(ids)] = torch.tensor(ids)
        return tokens
