"""Transformer blocks of the U-Net: cross-attention, GEGLU feed-forward, SpatialTransformer.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` by default, or
xformers' memory-efficient kernel when asked for and available on CUDA. Both are explicit per
module (``backend``, ``upcast``) and set for a whole model with ``set_attention_options``.
"""
import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


def exists(val):
    return val is not None


def default(val, d):
    return val if exists(val) else d


def xformers_available():
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # a broken xformers build raises all sorts of errors at import
        return False
    return torch.cuda.is_available()


UPCAST_AUTO = "auto"


def attention(q, k, v, backend="sdpa", upcast=UPCAST_AUTO):
    """Softmax attention over [B, heads, N, d] tensors; the output has the dtype of ``q``.

    ``upcast`` computes the logits, softmax and weighted sum in float32: SD 2.x v-models overflow
    in half precision otherwise (black images), which is why the official code defaults
    ATTN_PRECISION to fp32. Autocast is switched off around the kernel: it would cast the float32
    inputs of SDPA, einsum/bmm and xformers straight back to the autocast dtype.

    ``"auto"`` (the default) upcasts except for bfloat16 on the CPU. That is what the official code
    computes: it switches off only CUDA's autocast, so under a CPU bfloat16 autocast its float32
    logits are cast back to bfloat16 (diffusers' SDPA processor also stays in bfloat16). bfloat16
    has float32's exponent range, so nothing overflows; the float32 attention costs about a third
    of a 512px U-Net step on a CPU (bench/README.md). ``True`` upcasts there too.
    """
    dtype = q.dtype
    if upcast == UPCAST_AUTO:
        upcast = not (dtype == torch.bfloat16 and q.device.type == "cpu")
    if not upcast:
        return _attention_kernel(q, k, v, backend).to(dtype)
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    with _autocast_off(q.device.type):
        out = _attention_kernel(q.to(compute), k.to(compute), v.to(compute), backend)
    return out.to(dtype)


def _autocast_off(device_type):
    # meta tensors (shape-only model builds) have no autocast to switch off
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _attention_kernel(q, k, v, backend):
    if backend == "xformers" and q.is_cuda:
        import xformers.ops
        # xformers takes [B, N, heads, d]
        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        return torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): half the projection gates the other half."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from ``x`` over keys/values from ``context`` (or ``x``).

    ``context_hook``, None unless something is attached (``ldm.modules.hypernetworks``), maps the context to the
    contexts of the keys and of the values before their projections, whatever the attention backend.
    """

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0., backend="sdpa", upcast=UPCAST_AUTO):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.backend = backend
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.context_hook = None

    def forward(self, x, context=None, mask=None):
        if mask is not None:
            raise NotImplementedError("attention masks are not used by any Stable Diffusion model")
        context = default(context, x)
        context_k = context_v = context
        if self.context_hook is not None:
            context_k, context_v = self.context_hook(context)
        q, k, v = self.to_q(x), self.to_k(context_k), self.to_v(context_v)
        # [B, N, heads*d] -> [B, heads, N, d]
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = attention(q, k, v, backend=self.backend, upcast=self.upcast)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out(out)


# The official code names the xformers variant separately; configs may refer to it.
MemoryEfficientCrossAttention = CrossAttention


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim, n_heads, d_head, dropout=0., context_dim=None, gated_ff=True, checkpoint=True,
                 disable_self_attn=False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # With disable_self_attn the first attention also looks at the context (official behaviour).
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint and self.training)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


def Normalize(in_channels):
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` by cross-attention.

    Project in (1x1 conv, or linear with ``use_linear`` as in SD 2.x), ``depth`` transformer
    blocks, project out (zero-initialised), residual.
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0., context_dim=None,
                 disable_self_attn=False, use_linear=False, use_checkpoint=True):
        super().__init__()
        if exists(context_dim) and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        elif context_dim is None:
            context_dim = [None] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)])
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.use_linear = use_linear

    def forward(self, x, context=None):
        contexts = context if isinstance(context, list) else [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def set_attention_options(model, backend=None, upcast=None):
    """Choose the attention kernel and logit precision for every attention layer of ``model``."""
    if backend is not None and backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "xformers" and not xformers_available():
        logger.warning("xformers is not usable here (needs a working install and CUDA); using SDPA")
        backend = "sdpa"
    for module in model.modules():
        if isinstance(module, CrossAttention) or hasattr(module, "attn_backend"):
            if backend is not None:
                if isinstance(module, CrossAttention):
                    module.backend = backend
                else:
                    module.attn_backend = backend
            if upcast is not None and isinstance(module, CrossAttention):
                module.upcast = upcast
    return model
