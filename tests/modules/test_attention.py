import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.modules.attention import CrossAttention, SpatialTransformer, attention, set_attention_options


def test_backends_agree_with_the_softmax_definition():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(attention(q, k, v, backend=backend), ref, atol=1e-5, rtol=1e-5)


class KernelDtypes(TorchDispatchMode):
    """Records the input dtypes of the attention kernels as they run, i.e. after autocast has
    cast them (a Python wrapper around F.scaled_dot_product_attention would see them before)."""

    KERNELS = ("scaled_dot_product", "bmm", "softmax")

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(kernel in name for kernel in self.KERNELS):
            self.seen.setdefault(name, set()).update(
                a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        return func(*args, **(kwargs or {}))


def bf16_rounded_qkv(scale=3.0):
    """float32 tensors holding bfloat16 values, with attention logits up to ~40."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 2, 64, 32, generator=g) * scale).bfloat16().float() for _ in range(3)]


def softmax_reference(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_upcast_runs_the_kernels_in_float32_under_autocast(backend):
    q, k, v = (t.bfloat16() for t in bf16_rounded_qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with KernelDtypes() as upcast_on:
            out = attention(q, k, v, backend=backend, upcast=True)
        with KernelDtypes() as upcast_off:
            attention(q, k, v, backend=backend, upcast=False)
    assert out.dtype == torch.bfloat16
    assert upcast_on.seen and all(dtypes == {torch.float32} for dtypes in upcast_on.seen.values()), \
        upcast_on.seen
    # the control: without the upcast the same kernels see the autocast dtype
    assert any(torch.bfloat16 in dtypes for dtypes in upcast_off.seen.values()), upcast_off.seen


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_upcast_matches_a_float32_reference_under_autocast(backend):
    q, k, v = bf16_rounded_qkv()
    reference = softmax_reference(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend=backend, upcast=True)
    # Measured max abs error (|reference| up to 11): 6e-6 with the upcast for both backends;
    # when autocast casts back to bfloat16, 3.0e-2 (sdpa) and 2.8e-1 (math).
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_upcast_off_keeps_the_autocast_dtype():
    """ATTN_PRECISION=fp16: the kernels run in the autocast dtype, as before."""
    q, k, v = bf16_rounded_qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend="math", upcast=False)
    assert out.dtype == torch.float32
    error = (out - softmax_reference(q, k, v)).abs().max().item()
    assert error > 1e-2  # bf16 logits: 2.8e-1 measured


def test_upcast_keeps_fp16_logits_from_overflowing():
    """Logits of 300 * 300 * 8 / sqrt(8) = 2.5e5 overflow float16 (max 65504): the NaN behind
    the black images of SD 2.x v-models under fp16 autocast."""
    q = torch.full((1, 1, 4, 8), 300.0, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        out = attention(q, q, q, backend="math", upcast=True)
        overflowed = attention(q, q, q, backend="math", upcast=False)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, q)  # all keys equal: the output is v itself
    assert torch.isnan(overflowed).all()


@pytest.mark.parametrize("dtype, kernel_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_auto_upcast_keeps_cpu_bfloat16_as_the_official_code_computes_it(dtype, kernel_dtype):
    """The official upcast switches off CUDA's autocast only: on a CPU its bfloat16 attention stays
    bfloat16. float16 (which overflows) is still upcast."""
    q, k, v = (t.to(dtype) for t in bf16_rounded_qkv())
    with torch.autocast("cpu", dtype=dtype), KernelDtypes() as auto:
        out = attention(q, k, v, backend="sdpa")
    assert out.dtype == dtype
    assert auto.seen and all(dtypes == {kernel_dtype} for dtypes in auto.seen.values()), auto.seen
    q = torch.full((1, 1, 4, 8), 300.0, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isnan(attention(q, q, q, backend="math")).any()


def test_upcast_leaves_float64_alone():
    q, k, v = (t.double() for t in bf16_rounded_qkv())
    out = attention(q, k, v, backend="math", upcast=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, softmax_reference(q, k, v))


def test_attention_runs_on_the_meta_device():
    """Shape-only builds on the meta device have no autocast to switch off."""
    q = torch.empty(1, 2, 5, 8, device="meta")
    assert attention(q, q, q).shape == q.shape


def test_cross_attention_attends_to_the_context():
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=12, heads=2, dim_head=8)
    x = torch.randn(2, 5, 16)
    a = attn(x, context=torch.randn(2, 7, 12))
    b = attn(x, context=torch.randn(2, 7, 12))
    assert a.shape == x.shape and (a - b).abs().max() > 1e-4


def test_spatial_transformer_starts_as_identity():
    """proj_out is zero-initialised so a fresh block leaves the feature map unchanged."""
    block = SpatialTransformer(32, 2, 16, context_dim=12, use_linear=True)
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(block(x, context=torch.randn(1, 3, 12)), x)


def test_set_attention_options_validates_and_applies():
    block = SpatialTransformer(32, 2, 16, context_dim=12)
    set_attention_options(block, backend="math", upcast=False)
    attns = [m for m in block.modules() if isinstance(m, CrossAttention)]
    assert attns and all(m.backend == "math" and not m.upcast for m in attns)
    with pytest.raises(ValueError):
        set_attention_options(block, backend="flash9000")
    set_attention_options(block, backend="xformers")  # unavailable here: falls back, never crashes
    assert all(m.backend in ("sdpa", "xformers") for m in attns)


@pytest.mark.parametrize("lever, upcast", [("attention-upcast", True), ("attention-no-upcast", False)])
def test_attention_precision_levers(lever, upcast):
    from ldm.errors import UserError
    from ldm.fast_inference import apply_lever
    block = SpatialTransformer(32, 2, 16, context_dim=12)
    assert {m.upcast for m in block.modules() if isinstance(m, CrossAttention)} == {"auto"}
    apply_lever(block, lever)
    assert {m.upcast for m in block.modules() if isinstance(m, CrossAttention)} == {upcast}
    with pytest.raises(UserError, match="unknown speed lever"):
        apply_lever(block, "attention-fp8")
