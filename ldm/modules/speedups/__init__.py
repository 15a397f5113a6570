"""Opt-in approximate speed-ups of sampling, all off by default; each trades some fidelity to the exact computation
for speed (bench/README.md has the measured speed and quality cost of each):

- ``deepcache=N``: step caching of the U-Net's deep features, a full U-Net every N steps (:mod:`.deepcache`);
- ``tome=RATIO``: token merging before the self-attention at the finest attention level (:mod:`.tome`);
- ``int8=True``: int8 dynamic quantization of the U-Net's Linear layers, on the CPU (:mod:`.int8`).

:func:`approximated` applies the asked ones to a LatentDiffusion for the length of a ``with`` block and takes them
off after it, which gives back the model's exact computation bit for bit; ``ldm.generate`` runs every generation
call inside it. Step caching and token merging follow each sampling run through the model's ``run_listeners``,
which every sampler's guided model call tells when a run starts and which step it is at
(``ldm.models.diffusion.guidance``).
"""
from contextlib import contextmanager

from ldm.modules.speedups.deepcache import DEFAULT_DEPTH, DeepCache, check_interval
from ldm.modules.speedups.int8 import Int8Linears
from ldm.modules.speedups.tome import MAX_RATIO, TokenMerging, check_ratio

__all__ = ["DEFAULT_DEPTH", "MAX_RATIO", "DeepCache", "Int8Linears", "TokenMerging", "approximated",
           "check_approximations", "recorded_settings"]


def check_approximations(deepcache=0, deepcache_depth=None, tome=0.0, int8=False):
    """Refuse settings that cannot work, whatever the model (the depth's upper bound is checked on the model)."""
    from ldm.errors import UserError
    check_interval(deepcache)
    if deepcache_depth is not None and (isinstance(deepcache_depth, bool) or not isinstance(deepcache_depth, int)
                                        or deepcache_depth < 0):
        raise UserError(f"the step-caching depth must be a whole number, 0 or more, got {deepcache_depth!r}")
    check_ratio(tome)
    if not isinstance(int8, bool):
        raise UserError(f"int8 is True or False, got {int8!r}")


def recorded_settings(deepcache=0, deepcache_depth=None, tome=0.0, int8=False):
    """The settings that are on, as the PNG ``parameters`` keys of ``ldm.image_io`` (empty when all are off)."""
    recorded = {}
    if deepcache > 1:
        recorded.update(deepcache=deepcache, deepcache_depth=DEFAULT_DEPTH if deepcache_depth is None
                        else deepcache_depth)
    if tome:
        recorded["tome"] = tome
    if int8:
        recorded["int8"] = True
    return recorded


@contextmanager
def approximated(model, *, deepcache=0, deepcache_depth=None, tome=0.0, int8=False):
    """``model`` (a LatentDiffusion) with the asked speed-ups inside the block; exact again after it.

    ``deepcache``: a full U-Net every that many sampling steps (0 or 1: off), ``deepcache_depth`` its branch
    (None: ``DEFAULT_DEPTH``); ``tome``: the share of tokens merged before self-attention (0: off, at most
    ``MAX_RATIO``); ``int8``: quantize the U-Net's Linear layers (CPU only).
    """
    check_approximations(deepcache, deepcache_depth, tome, int8)
    unet = model.model.diffusion_model
    wanted = []   # every one built (and so checked against the model) before any is attached
    if int8:
        wanted.append(Int8Linears(unet))
    if tome:
        wanted.append(TokenMerging(unet, tome))
    if deepcache > 1:
        wanted.append(DeepCache(unet, deepcache, DEFAULT_DEPTH if deepcache_depth is None else deepcache_depth))
    applied, previous = [], vars(model).get("run_listeners")
    try:
        for speedup in wanted:
            applied.append(speedup)   # a half-done attach is undone too
            speedup.attach()
        listeners = tuple(a for a in applied if hasattr(a, "start_run"))
        if listeners:
            model.run_listeners = (*(previous or ()), *listeners)
        yield model
    finally:
        if previous is None:
            vars(model).pop("run_listeners", None)
        else:
            model.run_listeners = previous
        for speedup in reversed(applied):
            speedup.remove()
