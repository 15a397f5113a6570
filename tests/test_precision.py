"""Half precision runs only where it is fast: CUDA, or a CPU with native bfloat16/float16.

This machine's own CPU does not matter here: the tests describe a CPU by its flags
(``cpu_from_flags``) and hand it to ``ldm.precision`` directly, or replace ``host_cpu`` for the
calls that go through the library and the scripts.
"""
import logging

import numpy as np
import pytest
import torch

from ldm.checkpoint import load_model
from ldm.errors import UserError
from ldm.generate import precision_scope, txt2img
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.precision import (autocast_dtype, choose_precision, cpu_from_flags, host_cpu,
                           probe_native, read_cpu_flags)
import ldm.precision

CPU = torch.device("cpu")
# an AMD EPYC of the kind the project runs on, and a Sapphire Rapids-like Xeon
AVX2_ONLY = cpu_from_flags({"sse4_2", "avx", "avx2", "fma", "f16c"}, capability="AVX2")
NATIVE_HALF = cpu_from_flags({"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"},
                             capability="AVX512")
FAST = dict(steps=2, n_samples=1, progress=False)


@pytest.fixture
def simulate_cpu(monkeypatch):
    """``simulate_cpu(info)`` makes the library see ``info`` as this machine's CPU."""
    def simulate(info):
        monkeypatch.setattr(ldm.precision, "host_cpu", lambda: info)
    return simulate


def precision_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "ldm.precision" and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------
# what the CPU can do

@pytest.mark.parametrize("flags, native", [
    ({"avx", "avx2", "fma"}, set()),
    ({"avx512f", "avx512bw", "avx512_vnni"}, set()),          # AVX-512 alone is not enough
    ({"avx512f", "avx512_bf16"}, {torch.bfloat16}),             # Cooper Lake, Zen 4
    ({"amx_tile", "amx_bf16"}, {torch.bfloat16}),
    ({"avx512_bf16", "avx512_fp16"}, {torch.bfloat16, torch.float16}),
    ({"amx_fp16"}, {torch.float16}),
    ({"fp", "asimd", "bf16"}, {torch.bfloat16}),                # Arm "Features" (Neoverse V1)
])
def test_native_types_follow_the_cpu_flags(flags, native):
    assert cpu_from_flags(flags, "X").native == native


def test_read_cpu_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\n"
                   "processor\t: 1\nflags\t\t: fpu avx2 fma\n")
    assert read_cpu_flags(x86) == {"fpu", "avx2", "fma"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert read_cpu_flags(arm) == {"fp", "asimd", "bf16"}
    flagless = tmp_path / "flagless"
    flagless.write_text("processor\t: 0\ncpu\t\t: POWER9\n")
    assert read_cpu_flags(flagless) is None
    assert read_cpu_flags(tmp_path / "missing") is None


def test_host_cpu_probes_when_there_are_no_flags(monkeypatch):
    probed = []
    monkeypatch.setattr(ldm.precision, "read_cpu_flags", lambda: None)
    monkeypatch.setattr(ldm.precision, "probe_native", lambda dtype: probed.append(dtype) or False)
    host_cpu.cache_clear()
    try:
        info = host_cpu()
    finally:
        host_cpu.cache_clear()
    assert info.source == "timing probe" and info.native == frozenset()
    assert set(probed) == {torch.bfloat16, torch.float16}


@pytest.mark.skipif(read_cpu_flags() is None, reason="needs /proc/cpuinfo flags to compare with")
def test_probe_agrees_with_the_cpu_flags():
    """The fallback probe tells native from emulated bfloat16 on this machine as its flags do
    (native: 1.3-2x slower than float32; emulated: ~100x)."""
    from_flags = torch.bfloat16 in cpu_from_flags(read_cpu_flags()).native
    assert probe_native(torch.bfloat16) == from_flags


# ---------------------------------------------------------------------------------------------
# the decision

def test_avx2_cpu_runs_float32_and_says_why(caplog):
    chosen = choose_precision(torch.bfloat16, CPU, cpu=AVX2_ONLY, requested_by="bf16",
                              force_hint="bf16='force'")
    assert chosen.dtype == torch.float32 and chosen.path == "fp32 fallback"
    assert chosen.capability == "AVX2"
    [message] = precision_warnings(caplog)
    assert "no native bfloat16" in message and "AVX2" in message
    assert "running float32" in message and "bf16='force'" in message
    assert "\n" not in message


def test_forced_half_runs_emulated_with_a_warning(caplog):
    chosen = choose_precision(torch.bfloat16, CPU, cpu=AVX2_ONLY, force=True)
    assert chosen.dtype == torch.bfloat16 and chosen.path == "emulated bf16 (forced)"
    [message] = precision_warnings(caplog)
    assert "forced" in message and "slower" in message


def test_native_cpu_runs_the_half_type_quietly(caplog):
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        chosen = choose_precision(dtype, CPU, cpu=NATIVE_HALF)
        assert chosen.dtype == dtype and chosen.path == f"native {name}"
    assert precision_warnings(caplog) == []


def test_fp16_on_a_cpu_without_it_runs_float32(caplog):
    bf16_only = cpu_from_flags({"avx512_bf16"}, "AVX512")
    assert choose_precision(torch.float16, CPU, cpu=bf16_only).dtype == torch.float32
    assert "no native float16 (no avx512_fp16/amx_fp16" in precision_warnings(caplog)[0]
    assert choose_precision(torch.float16, CPU, cpu=bf16_only, force=True).dtype == torch.float16


def test_cuda_and_float32_are_kept_as_asked(caplog):
    cuda = torch.device("cuda")  # only compared, never used: no GPU needed
    assert choose_precision(torch.float16, cuda, cpu=AVX2_ONLY).path == "cuda fp16"
    assert choose_precision(torch.bfloat16, cuda, cpu=AVX2_ONLY).dtype == torch.bfloat16
    assert choose_precision(torch.float32, CPU, cpu=AVX2_ONLY).path == "fp32"
    assert precision_warnings(caplog) == []


@pytest.mark.parametrize("cpu, bf16, expected", [
    (AVX2_ONLY, True, None),
    (AVX2_ONLY, "force", torch.bfloat16),
    (NATIVE_HALF, True, torch.bfloat16),
    (NATIVE_HALF, False, None),
])
def test_cpu_autocast_dtype(cpu, bf16, expected):
    assert autocast_dtype(CPU, "autocast", bf16, cpu=cpu) == expected
    assert autocast_dtype(CPU, "full", bf16, cpu=cpu) == expected


def test_cuda_autocast_is_unchanged():
    cuda = torch.device("cuda")
    assert autocast_dtype(cuda, "autocast", False, cpu=AVX2_ONLY) == torch.float16
    assert autocast_dtype(cuda, "autocast", True, cpu=AVX2_ONLY) == torch.bfloat16
    assert autocast_dtype(cuda, "full", True, cpu=AVX2_ONLY) == torch.bfloat16
    assert autocast_dtype(cuda, "full", False, cpu=AVX2_ONLY) is None


FULL_SIZE, SMALL = 865_910_724, 6_700_000


@pytest.mark.parametrize("cpu, parameters, precision, expected", [
    (NATIVE_HALF, FULL_SIZE, "autocast", torch.bfloat16),
    (NATIVE_HALF, FULL_SIZE, "full", None),        # --precision full stays float32
    (NATIVE_HALF, SMALL, "autocast", None),        # the shipped model: per-op overhead, not matmuls
    (NATIVE_HALF, None, "autocast", None),
    (AVX2_ONLY, FULL_SIZE, "autocast", None),      # emulated: never chosen automatically, no warning
])
def test_cpu_autocast_auto_bf16(caplog, cpu, parameters, precision, expected):
    assert autocast_dtype(CPU, precision, "auto", cpu=cpu, parameters=parameters) == expected
    assert precision_warnings(caplog) == []


def test_cuda_autocast_auto_keeps_float16():
    cuda = torch.device("cuda")
    assert autocast_dtype(cuda, "autocast", "auto", cpu=NATIVE_HALF, parameters=FULL_SIZE) == torch.float16


def test_autocast_dtype_refuses_unknown_values():
    with pytest.raises(UserError, match="bf16 must be True, False, 'force' or 'auto'"):
        autocast_dtype(CPU, "autocast", "yes")
    with pytest.raises(UserError, match="precision 'double' is unknown"):
        autocast_dtype(CPU, "double", False)


# ---------------------------------------------------------------------------------------------
# through the library: sampling and loading

@pytest.fixture
def unet_precision(monkeypatch):
    """Records, for every U-Net forward, (CPU autocast dtype or None, U-Net weight dtype)."""
    seen = []
    forward = UNetModel.forward

    def recording_forward(self, *args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        seen.append((torch.get_autocast_dtype("cpu") if on else None, self.dtype))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", recording_forward)
    return seen


@pytest.mark.parametrize("cpu, bf16, expected", [
    (AVX2_ONLY, True, None),
    (AVX2_ONLY, "force", torch.bfloat16),
])
def test_txt2img_bf16_follows_the_cpu(tiny_model, simulate_cpu, unet_precision, caplog, cpu,
                                      bf16, expected):
    simulate_cpu(cpu)
    txt2img(tiny_model, "a circle", bf16=bf16, **FAST)
    assert unet_precision and {autocast for autocast, _ in unet_precision} == {expected}
    assert len(precision_warnings(caplog)) == 1  # one line per call, not per step
    with precision_scope(CPU, "autocast", bf16):
        assert torch.is_autocast_enabled("cpu") == (expected is not None)


@pytest.mark.parametrize("threshold, expected", [(1, torch.bfloat16), (10**12, None)])
def test_txt2img_auto_bf16_decides_by_the_denoiser_size(tiny_model, simulate_cpu, unet_precision, monkeypatch,
                                                        threshold, expected):
    simulate_cpu(NATIVE_HALF)
    monkeypatch.setattr(ldm.precision, "AUTO_BF16_MIN_PARAMETERS", threshold)
    txt2img(tiny_model, "a circle", bf16="auto", **FAST)
    assert unet_precision and {autocast for autocast, _ in unet_precision} == {expected}


@pytest.fixture
def bf16_config(tiny, tiny_files, tmp_path):
    """The tiny config with ``use_bf16: True`` in its U-Net, like configs/stable-diffusion/intel/*-bf16."""
    config = tiny.config()
    config["model"]["params"]["unet_config"]["params"]["use_bf16"] = True
    return tiny.write_config(config, tmp_path / "tiny-bf16.yaml")


@pytest.mark.parametrize("cpu, force, expected", [
    (AVX2_ONLY, False, torch.float32),
    (AVX2_ONLY, True, torch.bfloat16),
    (NATIVE_HALF, False, torch.bfloat16),
])
def test_use_bf16_config_follows_the_cpu(tiny_files, bf16_config, simulate_cpu, caplog, cpu, force,
                                         expected):
    simulate_cpu(cpu)
    model = load_model(bf16_config, tiny_files.ckpt, device="cpu", force_dtype=force)
    assert model.model.diffusion_model.dtype == expected
    assert model.first_stage_model.decoder.conv_out.weight.dtype == torch.float32
    warnings = precision_warnings(caplog)
    assert bool(warnings) == (cpu is AVX2_ONLY)
    assert all("use_bf16" in w for w in warnings)


@pytest.mark.parametrize("cpu, dtype, force, expected", [
    (AVX2_ONLY, "bf16", False, torch.float32),
    (AVX2_ONLY, "fp16", False, torch.float32),
    (AVX2_ONLY, "fp16", True, torch.float16),
    (NATIVE_HALF, "fp16", False, torch.float16),
    (NATIVE_HALF, torch.bfloat16, False, torch.bfloat16),
])
def test_dtype_argument_follows_the_cpu(tiny_files, simulate_cpu, caplog, cpu, dtype, force,
                                        expected):
    simulate_cpu(cpu)
    model = load_model(tiny_files.config, tiny_files.ckpt, device="cpu", dtype=dtype,
                       force_dtype=force)
    assert model.first_stage_model.decoder.conv_out.weight.dtype == expected
    warnings = precision_warnings(caplog)
    assert bool(warnings) == (cpu is AVX2_ONLY)
    assert all("force_dtype=True" in w for w in warnings if not force)


def test_use_fp16_stays_cuda_only(tiny, tiny_files, tmp_path, simulate_cpu, caplog):
    """The official 2.x YAMLs set use_fp16 for GPUs: even a CPU with native float16 keeps float32."""
    simulate_cpu(NATIVE_HALF)
    config = tiny.config()
    config["model"]["params"]["unet_config"]["params"]["use_fp16"] = True
    path = tiny.write_config(config, tmp_path / "tiny-fp16.yaml")
    with caplog.at_level(logging.INFO, logger="ldm"):
        model = load_model(path, tiny_files.ckpt, device="cpu")
    assert model.model.diffusion_model.dtype == torch.float32
    assert any("use_fp16 is for CUDA" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# through the scripts: --bf16 and --force-bf16

@pytest.mark.parametrize("flag, expected", [
    ("--bf16", (None, torch.float32)),
    ("--force-bf16", (torch.bfloat16, torch.bfloat16)),
])
def test_txt2img_script_on_an_avx2_cpu(scripts, tiny_files, bf16_config, tmp_path, simulate_cpu,
                                       unet_precision, caplog, flag, expected):
    """A use_bf16 config with --bf16 runs float32 and warns; --force-bf16 keeps bfloat16 for
    both the config's U-Net and autocast."""
    simulate_cpu(AVX2_ONLY)
    txt2img = scripts.load("txt2img")
    assert txt2img.main(["--config", str(bf16_config), "--ckpt", str(tiny_files.ckpt),
                         "--device", "cpu", "--steps", "1", "--n_samples", "1", "--skip_grid",
                         "--outdir", str(tmp_path / "out"), flag]) == 0
    assert unet_precision and set(unet_precision) == {expected}
    warnings = precision_warnings(caplog)
    assert warnings and all(("forced" in w) == (flag == "--force-bf16") for w in warnings)


def test_bf16_flags_exclude_each_other(scripts, tiny_files, tmp_path, capsys):
    txt2img = scripts.load("txt2img")
    assert txt2img.main(["--config", str(tiny_files.config), "--ckpt", str(tiny_files.ckpt),
                         "--outdir", str(tmp_path / "out"), "--bf16", "--force-bf16"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: argument --force-bf16: not allowed with argument --bf16"



# ---------------------------------------------------------------------------------------------
# the U-Net's weights held in bfloat16 for a bfloat16 autocast run

def test_weights_held_in_bfloat16_compute_what_autocast_computed(tiny_files, simulate_cpu):
    from ldm.precision import hold_weights_in
    simulate_cpu(AVX2_ONLY)  # "force": emulated or not, the same arithmetic
    held = load_model(tiny_files.config, tiny_files.ckpt, device="cpu")
    unet = held.model.diffusion_model
    float32_bytes = sum(p.numel() * 4 for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                        for p in m.parameters(recurse=False))
    assert hold_weights_in(unet, torch.bfloat16) == float32_bytes // 2
    assert unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert unet.out[0].weight.dtype == torch.float32  # norms stay float32
    plain = load_model(tiny_files.config, tiny_files.ckpt, device="cpu")
    for model in (held, plain):
        torch.manual_seed(0)
        model.images = txt2img(model, ["a red circle", "a blue square"], bf16="force", steps=3, n_samples=2,
                               progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(held.images, plain.images))


@pytest.mark.parametrize("flags, expected", [
    ([], (torch.bfloat16, torch.bfloat16)),                        # auto bf16: weights held in bfloat16
    (["--precision", "full"], (None, torch.float32)),
    (["--int8"], (torch.bfloat16, torch.float32)),                 # int8 quantizes float32 weights
])
def test_txt2img_script_holds_unet_weights_for_bf16_autocast(scripts, tiny_files, tmp_path, simulate_cpu,
                                                             unet_precision, monkeypatch, flags, expected):
    simulate_cpu(NATIVE_HALF)
    monkeypatch.setattr(ldm.precision, "AUTO_BF16_MIN_PARAMETERS", 1)
    txt2img_script = scripts.load("txt2img")
    assert txt2img_script.main(["--config", str(tiny_files.config), "--ckpt", str(tiny_files.ckpt),
                                "--device", "cpu", "--steps", "1", "--n_samples", "1", "--skip_grid",
                                "--outdir", str(tmp_path / "out"), *flags]) == 0
    assert unet_precision and set(unet_precision) == {expected}
