"""Which floating-point type actually runs: the one place that turns a request for bfloat16 or
float16 (autocast, a ``dtype`` argument, a config's ``use_bf16``) into the dtype used.

On CUDA a request is kept as it is. On the CPU a half-precision type only pays off where the CPU
has instructions for it (AVX512-BF16 / AMX-BF16, AVX512-FP16 / AMX-FP16). Elsewhere PyTorch
emulates it: on an AVX2-only AMD EPYC a 1024^3 bfloat16 matmul runs at 0.8 GFLOP/s against
96 GFLOP/s in float32, and a 3x3 conv 320->320 at 64x64 takes 27.7 s against 0.13 s, so one
512px image would take hours. There float32 runs instead, with a one-line warning saying why,
unless the caller forces the half type.

What the CPU can do comes from its flags in /proc/cpuinfo, or from a tiny timing probe where
that file is missing (macOS, Windows); callers and tests can pass a :class:`CpuInfo` instead.
"""
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.errors import UserError

log = logging.getLogger(__name__)

# CPU flags (x86 "flags", Arm "Features" in /proc/cpuinfo) under which oneDNN runs the type in
# hardware instead of converting every element to float32 and back.
NATIVE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LONG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# the value of a ``bf16`` argument that runs bfloat16 even on a CPU that only emulates it
FORCE_BF16 = "force"
# the value that decides by the CPU and the model: bfloat16 autocast where the CPU runs it natively and
# the denoiser is at least this large (the full-size U-Nets: 860 M parameters). A small model such as
# the shipped one spends its step in per-op overhead, not in matmuls, and keeps float32.
AUTO_BF16 = "auto"
AUTO_BF16_MIN_PARAMETERS = 100_000_000
# The probe calls a type native when its matmul is at most this many times slower than float32:
# native bfloat16 measured 1.3-2x slower (AVX512-BF16 Xeon), emulated 120x (AVX2 EPYC).
PROBE_MAX_SLOWDOWN = 8.0


@dataclass(frozen=True)
class CpuInfo:
    """The half-precision types a CPU runs natively, and how that was found out."""
    native: frozenset          # of torch dtypes
    capability: str            # torch.backends.cpu.get_cpu_capability(), e.g. "AVX2"
    source: str                # "cpu flags" or "timing probe"

    def describe(self):
        return f"PyTorch CPU kernels: {self.capability}"


def cpu_from_flags(flags, capability=None):
    """A :class:`CpuInfo` from CPU flag names (as in /proc/cpuinfo), e.g. to simulate a CPU."""
    flags = set(flags)
    native = frozenset(dtype for dtype, names in NATIVE_FLAGS.items() if flags & set(names))
    return CpuInfo(native, capability or torch.backends.cpu.get_cpu_capability(), "cpu flags")


def read_cpu_flags(path="/proc/cpuinfo"):
    """The flag names of the first CPU in ``path``; None when the file or its flags line is
    missing (not Linux, or an architecture that lists no flags)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def probe_native(dtype, size=128, repeats=3):
    """True when a ``size``^3 matmul in ``dtype`` is not much slower than in float32 (a few ms
    when native, ~20 ms when emulated)."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def best_time(x, y):
        x @ y  # warm-up: first calls pick kernels and allocate
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        full = best_time(a, b)
        half = best_time(a.to(dtype), b.to(dtype))
    return half <= PROBE_MAX_SLOWDOWN * full


@functools.cache
def host_cpu():
    """This machine's :class:`CpuInfo` (looked up once per process, on first use)."""
    flags = read_cpu_flags()
    if flags is not None:
        return cpu_from_flags(flags)
    native = frozenset(dtype for dtype in NATIVE_FLAGS if probe_native(dtype))
    return CpuInfo(native, torch.backends.cpu.get_cpu_capability(), "timing probe")


@dataclass(frozen=True)
class Precision:
    """The dtype that runs and which path led to it (for logs and the benchmark)."""
    dtype: torch.dtype
    path: str      # "fp32", "native bf16", "emulated bf16 (forced)", "fp32 fallback", "cuda fp16"
    capability: str = ""


def choose_precision(requested, device, *, force=False, cpu=None, requested_by="the caller",
                     force_hint="force=True"):
    """The :class:`Precision` to run for a ``requested`` dtype on ``device``.

    float32 and any non-CPU device: as requested. CPU with bfloat16/float16: the half type where
    the CPU runs it natively; where it would be emulated, float32 with a warning, or the half
    type anyway (with a warning that it is slow) when ``force``. ``cpu`` defaults to
    :func:`host_cpu`. ``requested_by`` and ``force_hint`` name, in the warning, the caller's own
    argument that asked for the half type and the one that forces it.
    """
    device = torch.device(device)
    name = NAMES.get(requested, str(requested).replace("torch.", ""))
    if requested not in NATIVE_FLAGS:
        return Precision(requested, name)
    if device.type != "cpu":
        return Precision(requested, f"{device.type} {name}")
    cpu = host_cpu() if cpu is None else cpu
    if requested in cpu.native:
        return Precision(requested, f"native {name}", cpu.capability)
    long_name, flags = LONG_NAMES[requested], "/".join(NATIVE_FLAGS[requested][:2])
    if force:
        log.warning("%s asks for %s on a CPU without native %s (no %s; %s): forced, so it runs "
                    "emulated, often 100x slower than float32", requested_by, long_name,
                    long_name, flags, cpu.describe())
        return Precision(requested, f"emulated {name} (forced)", cpu.capability)
    log.warning("%s asks for %s, but this CPU has no native %s (no %s; %s) and emulating it is "
                "often 100x slower: running float32 instead (%s runs %s anyway)", requested_by,
                long_name, long_name, flags, cpu.describe(), force_hint, long_name)
    return Precision(torch.float32, "fp32 fallback", cpu.capability)


def auto_bf16(device, parameters, *, cpu=None):
    """Whether ``bf16="auto"`` runs bfloat16: on a CPU with native bfloat16, for a denoiser of at least
    AUTO_BF16_MIN_PARAMETERS ``parameters`` (there it took a full-size U-Net step from 9.5 s to 6.0 s on
    an AVX512-BF16 EPYC, bench/results/unet_step.json). CUDA keeps its float16 autocast."""
    device = torch.device(device)
    if device.type != "cpu" or parameters is None or parameters < AUTO_BF16_MIN_PARAMETERS:
        return False
    cpu = host_cpu() if cpu is None else cpu
    return torch.bfloat16 in cpu.native


def autocast_dtype(device, precision="autocast", bf16=False, *, cpu=None, parameters=None):
    """The autocast dtype of a sampling call, or None for plain float32 (see ``precision_scope``
    in ldm.generate). ``bf16``: False, True, ``"force"`` to run bfloat16 even on a CPU that
    only emulates it, or ``"auto"``: with ``precision="autocast"`` on a CPU with native bfloat16,
    bfloat16 when the denoiser has ``parameters`` >= AUTO_BF16_MIN_PARAMETERS, else as False."""
    if precision not in ("autocast", "full"):
        raise UserError(f"precision '{precision}' is unknown; use autocast or full")
    if bf16 is None:
        bf16 = False
    if bf16 not in (False, True, FORCE_BF16, AUTO_BF16):
        raise UserError(f"bf16 must be True, False, '{FORCE_BF16}' or '{AUTO_BF16}', got {bf16!r}")
    if bf16 == AUTO_BF16:
        bf16 = precision == "autocast" and auto_bf16(device, parameters, cpu=cpu)
    if precision == "full" and not bf16:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if bf16 else torch.float16
    if device.type == "cpu" and bf16:
        # float16 CPU autocast is not offered: the official scripts use bfloat16 on the CPU
        chosen = choose_precision(torch.bfloat16, device, force=bf16 == FORCE_BF16, cpu=cpu,
                                  requested_by="bf16", force_hint=f"bf16='{FORCE_BF16}'")
        return chosen.dtype if chosen.dtype != torch.float32 else None
    return None


def hold_weights_in(module, dtype):
    """Store the weights and biases of ``module``'s convolutions and linear layers in ``dtype``; returns
    how many bytes that freed.

    Under an autocast to ``dtype`` these layers compute bit for bit as before, since autocast casts their
    float32 weights to ``dtype`` anyway; but it also caches those cast copies for the whole autocast
    region (a sampling run), a second copy of the weights beside the float32 ones. Holding them in
    ``dtype`` drops both (and the float32 weights' pages of a memory-mapped checkpoint,
    ``ldm.mapped_pages``). One way: the float32 weights are not kept, so only for a model that from
    then on runs under that autocast (norms, embeddings and the rest stay float32)."""
    from ldm.mapped_pages import release_file_pages
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    freed = 0

    def replaced():   # each float32 weight's pages go as soon as its copy is made, so they never all sit together
        nonlocal freed
        for layer in module.modules():
            if not isinstance(layer, layers):
                continue
            for name in ("weight", "bias"):
                param = getattr(layer, name, None)
                if param is None or param.dtype == dtype or not param.is_floating_point():
                    continue
                freed += param.numel() * (param.element_size() - torch.finfo(dtype).bits // 8)
                setattr(layer, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
                yield param.detach()

    release_file_pages(replaced())
    return freed
