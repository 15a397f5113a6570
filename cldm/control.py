"""ControlNet inputs as conditioning: several ControlNets at once, each with its own hint, residual
weights and step range, through the one guided model call every sampler shares.

A ``ControlLDM``'s conditioning is ``{"c_crossattn": [text], "c_concat": ...}`` where ``c_concat`` is

- None: no control (the plain U-Net);
- ``[hint]``, as lllyasviel/ControlNet passes it: the model's own ``control_model`` weighted by its
  ``control_scales``;
- ``[ControlHint, ...]``: one entry per ControlNet, residuals summed. A ``ControlHint`` is None
  outside its step range (``at(step)``), so a unit there contributes nothing.

Either side of classifier-free guidance may lack an entry (None in its place: guess mode, the
unconditional half without control); the stacked batch then carries a ``PartialConditioning`` of
the rows that have it (see ``ldm.modules.partial_conditioning``).
"""
from dataclasses import dataclass, replace

import torch

from ldm.modules.partial_conditioning import PartialConditioning


@dataclass(frozen=True, eq=False)   # compared by identity: it holds a tensor
class ControlHint:
    """One ControlNet's input for a sampling run.

    ``hint`` [B, hint_channels, 8h, 8w] in [0, 1] (pixel resolution for SD); ``scales`` weight its
    residuals, one per residual (``cldm.cldm.control_scales``); ``control_model`` is a
    ``cldm.cldm.ControlNet``, None for the ControlLDM's own; ``global_average_pooling`` None for the
    ControlLDM's setting (ControlNet 1.1 shuffle pools). It acts on the sampling steps i (from 0)
    with ``start <= i / steps <= end``, sd-webui-controlnet's guidance start/end; without ``steps``
    on all of them.
    """
    hint: torch.Tensor
    scales: tuple
    control_model: object = None
    global_average_pooling: object = None
    steps: object = None
    start: float = 0.0
    end: float = 1.0

    def at(self, step):
        if self.steps is None or self.start <= step / self.steps <= self.end:
            return self
        return None

    def cat_batch(self, first):
        """``first``'s rows, then this hint's: the same ControlNet and weights on a larger batch."""
        if first.control_model is not self.control_model or tuple(first.scales) != tuple(self.scales):
            raise ValueError("cannot stack hints of different ControlNets or weights into one batch")
        return replace(self, hint=torch.cat([first.hint, self.hint]))


def control_inputs(c_concat):
    """(ControlHint or official hint list, rows) for each ControlNet input in ``c_concat``; rows is
    None for the whole batch, else the slice of the rows the input conditions."""
    rows = None
    if isinstance(c_concat, PartialConditioning):
        c_concat, rows = c_concat.value, c_concat.rows
    if not c_concat:
        return []
    if all(isinstance(h, torch.Tensor) for h in c_concat):
        return [(list(c_concat), rows)]
    inputs = []
    for entry in c_concat:
        if isinstance(entry, PartialConditioning):
            inputs.append((entry.value, entry.rows))
        elif entry is not None:
            inputs.append((entry, rows))
    return inputs
