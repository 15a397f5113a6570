"""Step caching of the U-Net's deep features across adjacent sampling steps (Ma, Fang & Wang 2023, "DeepCache:
Accelerating Diffusion Models for Free").

The high-level features that the U-Net's deep path hands to its last output blocks change little from one
sampling step to the next. On a cache step (every ``interval``-th step) the U-Net runs in full and keeps those
features; on the steps in between only the shallow path runs and the kept features stand in for everything deeper.

With ``n`` input and ``n`` output blocks (output block ``n - 1 - i`` takes the skip of input block ``i``) and the
branch ``depth`` d:

    shallow path   input blocks 0..d, then output blocks n-1-d..n-1 and the output layer
    cached         the features entering output block n-1-d (before input block d's skip joins them): the
                   output of input blocks d+1.., the middle block and output blocks ..n-2-d

Depth 0 (the default) re-runs only the input conv and the last output block: for SD that is DeepCache's
default branch (``cache_branch_id=0``); depth 1 adds the first block at full resolution and its partner (their
branch 1), and so on.

Steps are the sampler's (``GuidedModel.step``, heard through ``at_step``): every evaluation of a cache step runs
in full (a second-order sampler's two included) and refreshes the cache. A sampling run starts with an empty
cache (``start_run``), and a batch of another shape than the cached one runs in full.
"""
import torch

from ldm.errors import UserError
from ldm.modules.diffusionmodules.openaimodel import UNetModel

DEFAULT_DEPTH = 0


def check_interval(interval):
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise UserError(f"the step-caching interval must be a whole number, 0 or 1 (off) or more, got {interval!r}")


def check_depth(depth, blocks):
    """``depth`` must name one of the ``blocks`` input blocks of the U-Net."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth < blocks:
        raise UserError(f"the step-caching depth must be a whole number from 0 to {blocks - 1} for this U-Net "
                        f"({blocks} input blocks), got {depth!r}")


class DeepCache:
    """Step caching on ``unet`` (a ``UNetModel``): ``attach()`` makes its forward cache, ``remove()`` restores it.

    ``interval`` 1 caches nothing (every step runs in full: the exact computation); 2 runs every other step
    shallow. ``deep_evaluations`` counts the full forwards since the run started.
    """

    def __init__(self, unet, interval, depth=DEFAULT_DEPTH):
        if not isinstance(unet, UNetModel) or type(unet).forward is not UNetModel.forward:
            raise UserError(f"step caching works on the plain U-Net; {type(unet).__name__} computes its own "
                            f"forward (a ControlNet's residuals reach every skip connection)")
        check_interval(interval)
        if interval < 1:
            raise UserError("step caching needs an interval of 1 or more")
        check_depth(depth, len(unet.input_blocks))
        self.unet = unet
        self.interval = interval
        self.depth = depth
        self.step = 0
        self.cache = None            # (batch key, features [B, C, h, w])
        self.deep_evaluations = 0

    # ------------------------------------------------------------------ following the sampling run
    def start_run(self):
        self.step, self.cache, self.deep_evaluations = 0, None, 0

    def at_step(self, step):
        self.step = step

    # ------------------------------------------------------------------ attaching
    def attach(self):
        if "forward" in vars(self.unet):
            raise RuntimeError("the U-Net's forward is already replaced by something else; remove that first")
        self.unet.forward = self.forward
        return self

    def remove(self):
        if vars(self.unet).get("forward") == self.forward:
            del self.unet.forward
        self.cache = None

    # ------------------------------------------------------------------ the forward
    def _reuses(self, key):
        return self.step % self.interval != 0 and self.cache is not None and self.cache[0] == key

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """``UNetModel.forward`` (the same operations in the same order on a cache step), shallow in between."""
        unet = self.unet
        key = (tuple(x.shape), x.dtype, x.device)
        reuse = self._reuses(key)
        h, emb, context = unet.embed(x, timesteps, context, y)
        skips = []
        for module in unet.input_blocks[:self.depth + 1] if reuse else unet.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        if reuse:
            h = self.cache[1]
        else:
            h = unet.middle_block(h, emb, context)
            self.deep_evaluations += 1
        branch = len(unet.output_blocks) - 1 - self.depth   # the output block taking input block depth's skip
        for i, module in enumerate(unet.output_blocks):
            if i < branch and reuse:
                continue
            if i == branch and not reuse:
                self.cache = (key, h)
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        out = unet.id_predictor(h) if unet.predict_codebook_ids else unet.out(h)
        return out.to(x.dtype)
