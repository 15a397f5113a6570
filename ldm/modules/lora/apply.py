"""Merging LoRAs into a model's weights, and taking them out again exactly.

One loaded model serves many prompts with different LoRAs: :class:`LoraMerger` adds the weight changes
of a set of LoRAs into the weights (``W + multiplier * delta``, computed in float32 and stored in the
weight's own dtype) after keeping a copy of every weight it touches; :meth:`LoraMerger.remove` copies
those back, so the weights are bit for bit what they were. Applying a new set removes the previous one
first. A multiplier of 0 leaves the weights alone.

Each LoRA takes two multipliers, as A1111's ``<lora:name:te:unet>``: one for the text encoder and one
for the U-Net (``<lora:name:w>`` is both = w).

Merging changes the model's live weights: a model sampling from EMA weights (``use_ema`` with
``ema_scope``) would swap them out, so inference configs keep ``use_ema: False``.
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.modules.lora.formats import LoraFile, load_lora
from ldm.modules.lora.names import ModuleNames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraUse:
    """One LoRA with its multipliers: ``text_encoder`` for the text-encoder layers, ``unet`` for the U-Net."""
    lora: LoraFile
    text_encoder: float = 1.0
    unet: float = 1.0

    def multiplier(self, part):
        return self.text_encoder if part == "text_encoder" else self.unet


def lora_use(lora, weight=1.0, unet_weight=None):
    """A1111's reading of ``<lora:name:weight>`` (both parts ``weight``) and ``<lora:name:te:unet>``."""
    return LoraUse(lora, float(weight), float(weight if unet_weight is None else unet_weight))


class LoraMerger:
    """Applies sets of LoRAs to one model: ``apply(uses)``, ``remove()``, or ``with merger.applied(uses):``.

    ``load(path)`` reads a LoRA file for this model (the layer names are worked out once per model).
    """

    def __init__(self, model):
        self.model = model
        self._names = None
        self._files = {}     # (resolved path, mtime) -> LoraFile
        self._backup = {}    # parameter name -> its original tensor (CPU copy)
        self.active = ()     # the LoraUse tuple now merged

    @property
    def names(self):
        if self._names is None:
            self._names = ModuleNames.for_model(self.model)
        return self._names

    def load(self, path):
        """The :class:`~ldm.modules.lora.formats.LoraFile` at ``path``, read for this model (kept, so a file
        named by many prompts is read once; read again when it changed on disk)."""
        path = Path(path)
        if not path.is_file():
            return load_lora(path, self.names)  # says what is wrong with the path
        key = (str(path.resolve()), path.stat().st_mtime_ns)
        if key not in self._files:
            self._files[key] = load_lora(path, self.names)
        return self._files[key]

    def apply(self, uses):
        """Merge ``uses`` (LoraUse, or (LoraFile, text-encoder multiplier, U-Net multiplier) tuples) into
        the weights, after removing whatever was merged before."""
        uses = tuple(u if isinstance(u, LoraUse) else LoraUse(*u) for u in uses)
        self.remove()
        params = dict(self.model.named_parameters())
        changes = {}  # parameter name -> [(ModuleDelta, multiplier)]
        for use in uses:
            for delta in use.lora.deltas:
                multiplier = use.multiplier(delta.target.part)
                if multiplier == 0:
                    continue
                param = params.get(delta.target.param)
                shape = None if param is None else _rows_shape(param, delta.target.rows)
                if shape != tuple(delta.shape):
                    raise UserError(f"LoRA '{use.lora.source}' was read for another model: this model's "
                                    f"{delta.target.describe()} is {shape}, not {list(delta.shape)}")
                changes.setdefault(delta.target.param, []).append((delta, multiplier))
        try:
            with torch.no_grad():
                for name, items in changes.items():
                    self._merge(name, params[name], items)
        except BaseException:
            self.remove()  # never leave half a set merged
            raise
        self.active = uses
        if uses:
            log.info("merged %d LoRA(s) into %d weights", len(uses), len(self._backup))

    def _merge(self, name, param, items):
        self._backup[name] = param.detach().to("cpu", copy=True)
        merged = param.detach().to(torch.float32, copy=True)
        for delta, multiplier in items:
            rows = delta.target.rows
            view = merged if rows is None else merged[rows[0]:rows[1]]
            view += multiplier * delta.delta().to(merged.device)
        param.copy_(merged)  # back in the weight's own dtype

    def remove(self):
        """Restore every weight the merged LoRAs touched (bit for bit)."""
        if self._backup:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, original in self._backup.items():
                    params[name].copy_(original)
            log.info("removed LoRAs from %d weights", len(self._backup))
        self._backup = {}
        self.active = ()

    @contextmanager
    def applied(self, uses):
        """``uses`` merged inside the block, removed after it."""
        self.apply(uses)
        try:
            yield self
        finally:
            self.remove()


def _rows_shape(param, rows):
    shape = tuple(param.shape)
    return shape if rows is None else (rows[1] - rows[0],) + shape[1:]
