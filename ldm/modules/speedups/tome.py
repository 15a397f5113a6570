"""Token merging before the U-Net's self-attention (Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion", after ToMe, Bolya et al. 2023).

At the U-Net's finest attention level (the most tokens, where self-attention costs most), each self-attention
sees ``ratio`` fewer tokens: similar tokens are merged into one before it, and its output is copied back to every
token merged ("unmerging"), so the rest of the transformer block (residual, cross-attention, feed-forward) still
sees every token. Cross-attention and the feed-forward are left exact, as in ToMe-SD's default.

Bipartite soft matching with ToMe-SD's random 2D partition (sec. 4.1 and 4.3 of the paper):

    dst     one token, drawn at random, of every 2x2 patch of the h x w token grid (a row or column left
            over at an odd size is all src)
    src     the other tokens
    match   each src token's most similar dst token (cosine similarity of the attention's input)
    merge   the r = int(ratio * N) src tokens with the most similar match are averaged into it

Only src tokens merge, so ``ratio`` is at most 3/4. The draws come from a generator seeded at the start of
every sampling run (``start_run``), so a run is reproducible.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer

MAX_RATIO = 0.75  # 1 - 1 / (2 * 2): one token in four is a dst and never merges
DEFAULT_SEED = 0


def check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= MAX_RATIO:
        raise UserError(f"the token-merging ratio must be from 0 (off) to {MAX_RATIO}, got {ratio!r}")


def random_dst_mask(h, w, generator):
    """[h * w] bool, True at one random token of every 2x2 patch of the h x w grid (row-major)."""
    hs, ws = h // 2, w // 2
    pick = torch.randint(4, (hs, ws, 1), generator=generator)
    patches = torch.zeros(hs, ws, 4, dtype=torch.bool).scatter_(2, pick, True)
    # [hs, ws, 2 * 2] -> [hs, 2, ws, 2] -> [2 hs, 2 ws]
    grid = patches.view(hs, ws, 2, 2).permute(0, 2, 1, 3).reshape(2 * hs, 2 * ws)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:2 * hs, :2 * ws] = grid
    return mask.flatten()


@dataclass
class Merge:
    """One bipartite matching over N tokens: ``merge`` [B, N, C] -> [B, N - r, C] and its inverse ``unmerge``
    (exact for the tokens that were not merged; a merged token gets its dst token's value)."""
    src: torch.Tensor       # [Ns] token indices of the src side
    dst: torch.Tensor       # [Nd] token indices of the dst side
    kept: torch.Tensor      # [B, Ns - r] positions among src of the tokens not merged
    merged: torch.Tensor    # [B, r] positions among src of the merged tokens
    into: torch.Tensor      # [B, r] positions among dst they merge into

    @property
    def tokens(self):
        return len(self.src) + len(self.dst)

    def merge(self, x):
        c = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]
        kept = src.gather(1, self.kept[..., None].expand(-1, -1, c))
        moving = src.gather(1, self.merged[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, self.into[..., None].expand(-1, -1, c), moving, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y):
        b, _, c = y.shape
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]
        src = y.new_empty(b, len(self.src), c)
        src.scatter_(1, self.kept[..., None].expand(-1, -1, c), kept)
        src.scatter_(1, self.merged[..., None].expand(-1, -1, c), dst.gather(1, self.into[..., None].expand(-1, -1, c)))
        out = y.new_empty(b, self.tokens, c)
        out[:, self.src] = src
        out[:, self.dst] = dst
        return out


def bipartite_matching(metric, r, dst_mask):
    """The :class:`Merge` of ``r`` src tokens of ``metric`` [B, N, C] into their most similar dst token."""
    device = metric.device
    dst, src = dst_mask.nonzero()[:, 0].to(device), (~dst_mask).nonzero()[:, 0].to(device)
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, src] @ unit[:, dst].transpose(1, 2)      # [B, Ns, Nd] cosine similarities
    best, best_dst = scores.max(dim=-1)                        # [B, Ns]
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    return Merge(src, dst, kept, merged, best_dst.gather(1, merged))


class TokenMerging:
    """Token merging on ``unet``'s self-attentions at its finest attention level: ``attach()``, ``remove()``.

    The finest level is the smallest downsampling among the U-Net's ``attention_resolutions`` (1 for SD, where
    it is ToMe-SD's default); a transformer runs there when its grid is at least the latent's size divided by
    that factor.
    """

    def __init__(self, unet, ratio, seed=DEFAULT_SEED):
        check_ratio(ratio)
        self.unet = unet
        self.ratio = ratio
        self.seed = seed
        self.factor = min(getattr(unet, "attention_resolutions", None) or [1])
        self.generator = torch.Generator().manual_seed(seed)
        self.latent_hw = None
        self.grid = None             # (h, w) of the transformer running now, when it is at the finest level
        self._hooks = []
        self._wrapped = []

    # ------------------------------------------------------------------ following the sampling run
    def start_run(self):
        self.generator.manual_seed(self.seed)

    def at_step(self, step):
        pass

    # ------------------------------------------------------------------ attaching
    def attach(self):
        self._hooks.append(self.unet.register_forward_pre_hook(self._see_latent))
        for module in self.unet.modules():
            if isinstance(module, SpatialTransformer):
                self._hooks.append(module.register_forward_pre_hook(self._see_grid))
            elif isinstance(module, BasicTransformerBlock) and not module.disable_self_attn:
                attention = module.attn1
                if "forward" in vars(attention):
                    raise RuntimeError("a self-attention's forward is already replaced by something else")
                attention.forward = self._merged(attention.forward)
                self._wrapped.append(attention)
        return self

    def remove(self):
        for hook in self._hooks:
            hook.remove()
        for attention in self._wrapped:
            vars(attention).pop("forward", None)
        self._hooks, self._wrapped = [], []

    def _see_latent(self, module, args):
        self.latent_hw = tuple(args[0].shape[-2:])

    def _see_grid(self, module, args):
        h, w = args[0].shape[-2:]
        finest = self.latent_hw is not None and h >= self.latent_hw[0] // self.factor \
            and w >= self.latent_hw[1] // self.factor
        # a grid without a full 2x2 patch has no dst token to merge into
        self.grid = (h, w) if finest and min(h, w) >= 2 else None

    def _merged(self, attend):
        def forward(x, context=None, mask=None):
            r = int(x.shape[1] * self.ratio)
            if self.grid is None or r == 0:
                return attend(x, context, mask)
            merge = bipartite_matching(x, r, random_dst_mask(*self.grid, self.generator))
            return merge.unmerge(attend(merge.merge(x), context, mask))
        return forward
