"""Textual inversion (Gal et al. 2022): new input vectors for one trigger word, trained on a frozen model.

Prompts read the vectors through the text encoder's embeddings (``ldm.modules.encoders.embeddings``), the way
``--embeddings DIR`` reads a downloaded file: the trigger word's tokens become ``n_vectors`` placeholder
positions whose token embeddings are replaced by the vectors. Training runs that very path with the vectors as
parameters, so the exported file gives at sampling time exactly the conditioning it was trained with.

Files written into ``<run>/adapters/`` (the trigger word is the file name, as A1111 reads it); each folder can
be passed to ``--embeddings`` (both in one folder would be two files for one trigger word):

``pt/<token>.pt``                    A1111's ``Embedding.save``: ``{"string_to_token": {"*": 265},
                                     "string_to_param": {"*": [n, D]}, "name", "step", "sd_checkpoint" (the
                                     base weights' sha256, 10 hex digits), "sd_checkpoint_name" (their file stem)}``
``safetensors/<token>.safetensors``  kohya sd-scripts' ``{"emb_params": [n, D]}``
"""
import contextlib
import logging

import torch
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.models.personalise.adapter_training import AdapterTraining
from ldm.modules.encoders.embeddings import Embedding, EmbeddingSet, use_embeddings
from ldm.modules.encoders.prompt_encoder import ChunkedTextEncoder
from ldm.modules.encoders.tokenizer import load_bpe

log = logging.getLogger(__name__)

A1111_TOKEN_ID = 265  # what A1111 writes in string_to_token; readers ignore it
WORD_END = "</w>"


class TextualInversion(AdapterTraining):
    """``n_vectors`` new vectors for the trigger word ``token``, starting from the token embeddings of
    ``init_word`` (vector i takes token ``i * m // n`` of its first ``m <= n`` tokens, as A1111 spreads them).
    Everything else stays frozen. Other arguments: :class:`AdapterTraining`."""

    needs_prompt_gradients = True

    def __init__(self, token, init_word, n_vectors=1, **training):
        token, init_word = _checked_words(token, init_word)
        super().__init__(**training)
        encoder = self.base.cond_stage_model
        if not isinstance(encoder, ChunkedTextEncoder):
            raise UserError(f"textual inversion needs a prompt text encoder; the base model's conditioning is "
                            f"{type(encoder).__name__}")
        room = encoder.tokenizer.max_length - 2
        if isinstance(n_vectors, bool) or not isinstance(n_vectors, int) or not 1 <= n_vectors <= room:
            raise UserError(f"n_vectors must be an integer from 1 to {room} (the encoder's prompt length), "
                            f"got {n_vectors!r}")
        if not encoder.tokenizer.encode(token):
            raise UserError(f"token {token!r} has no tokens for the tokenizer; give a trigger word with letters "
                            f"or digits")
        self.token = token
        self.vectors = torch.nn.Parameter(_initial_vectors(encoder, init_word, n_vectors))
        # the encoder's table of trigger words, built once; attached() puts the live vectors into it
        previous = encoder.embeddings
        self._prompt_embeddings = use_embeddings(encoder, EmbeddingSet({token: Embedding(token, self.vectors.data)}))
        encoder.embeddings = previous

    def adapter_parameters(self):
        return [self.vectors]

    @contextlib.contextmanager
    def attached(self):
        encoder = self.base.cond_stage_model
        previous = encoder.embeddings
        self._prompt_embeddings.embeddings[self.token].vectors = self.vectors
        encoder.embeddings = self._prompt_embeddings
        try:
            yield
        finally:
            encoder.embeddings = previous

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 0 and batch_idx == 0:
            self._check_captions(batch)

    def _check_captions(self, batch):
        """A caption without the trigger word teaches the vectors nothing; none in the first batch means that
        the data and ``token`` disagree."""
        ids = self.base.cond_stage_model.tokenizer.encode(self.token)
        captions = batch.get(self.base.cond_stage_key) or []
        tokenized = [self.base.cond_stage_model.tokenizer.encode(c) for c in captions if isinstance(c, str)]
        if not any(_contains(t, ids) for t in tokenized):
            log.warning("no caption of the first batch contains the trigger word %r (e.g. %r): the vectors only "
                        "learn from captions that do", self.token, captions[0] if captions else None)

    def export(self, directory, step):
        vectors = self.vectors.detach().to("cpu", torch.float32).clone()
        for folder in ("pt", "safetensors"):
            (directory / folder).mkdir(exist_ok=True)
        torch.save({"string_to_token": {"*": A1111_TOKEN_ID}, "string_to_param": {"*": vectors}, "name": self.token,
                    "step": int(step), "sd_checkpoint": self.base_hash, "sd_checkpoint_name": self.base_ckpt.stem},
                   directory / "pt" / f"{self.token}.pt")
        save_file({"emb_params": vectors}, directory / "safetensors" / f"{self.token}.safetensors",
                  metadata={"name": self.token, "step": str(int(step)), "sd_checkpoint": self.base_hash,
                            "sd_checkpoint_name": self.base_ckpt.stem})
        log.info("textual inversion %r (%d vectors, step %d) written to %s", self.token, len(vectors), step,
                 directory)


def _checked_words(token, init_word):
    if not isinstance(token, str) or not token.strip() or token != token.strip() or any(c in token for c in "/\\"):
        raise UserError(f"token must be a trigger word without slashes or surrounding spaces (it names the "
                        f"exported files), got {token!r}")
    if not isinstance(init_word, str) or not init_word.strip():
        raise UserError(f"init_word is empty; give a word whose token embedding starts the vectors (e.g. a "
                        f"close colour, 'blue'), got {init_word!r}")
    return token, init_word


def _initial_vectors(encoder, init_word, n_vectors):
    """``[n_vectors, D]`` copies of the token embeddings of ``init_word``, which must be made of whole
    vocabulary words: a word the tokenizer splits into pieces would start from meaningless fragments."""
    ids = encoder.tokenizer.encode(init_word)
    symbols = {i: s for s, i in load_bpe()[0].items()}
    pieces = [symbols[i] for i in ids if not symbols[i].endswith(WORD_END)]
    if not ids or pieces:
        why = f"splits it into pieces ({', '.join(repr(p) for p in pieces[:5])})" if pieces else "gives no tokens"
        raise UserError(f"init_word {init_word!r} is not a word the tokenizer knows (it {why}); give vocabulary "
                        f"words such as 'blue'")
    if len(ids) > n_vectors:
        log.warning("init_word %r has %d tokens; the %d vectors start from the first %d", init_word, len(ids),
                    n_vectors, n_vectors)
        ids = ids[:n_vectors]
    rows = torch.tensor([ids[i * len(ids) // n_vectors] for i in range(n_vectors)])
    table = encoder.token_embedding_layer().weight
    return table.detach()[rows.to(table.device)].to(torch.float32).clone()


def _contains(sequence, part):
    return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))
