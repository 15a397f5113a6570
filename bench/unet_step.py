"""One full-size Stable Diffusion 2.x U-Net step on the CPU: seconds, TFLOP/s and peak memory.

    python bench/unet_step.py [--sizes 64 96] [--dtypes fp32 bf16] [--repeats 5]
                              [--out bench/results/unet_step.json --force]

The U-Net is built from the `unet_config` of configs/stable-diffusion/v2-inference.yaml with random
weights (activation checkpointing off: this is inference). One step is one forward at
classifier-free-guidance batch 2: latents [2, 4, S, S], timesteps [2], context [2, 77, 1024].

Precisions: `fp32`; `bf16` runs two ways, `bf16-autocast` (fp32 weights under CPU autocast, as
`--bf16`) and `bf16-weights` (weights and inputs cast to bfloat16, as a `use_bf16` config). Which
path runs is decided by ldm.precision, as in the scripts: `native bf16` on a CPU with AVX512-BF16
or AMX-BF16, else `fp32 fallback` (the bf16 rows then time float32), or with `--force-bf16`
`emulated bf16 (forced)`; the table and JSON name the path and the CPU capability string.
FLOPs are counted once per shape with
torch.utils.flop_counter.FlopCounterMode. Each (implementation, precision) runs in its own
process, shapes in ascending order, so its peak RSS is its own: the peak after a shape covers the
weights plus the largest activations so far.

When `diffusers` is importable, its UNet2DConditionModel with the equivalent configuration runs
in the same way as a peer (see bench/README.md for installing it without touching the project's
environment), with the same weights: the parent process seeds our U-Net once (the zero-initialised
output layers get random values too, or every output would be 0), writes it to a safetensors file in
a temporary folder, and every worker loads it (diffusers' after diffusers' own key conversion).

`--levers` adds fp32 rows of our U-Net with one speed lever each (`ldm.fast_inference`, or an allocator), or
several joined by "+". Every row
reports `rel err`: max |out - ref| / max |ref| against our eager fp32 output for the same input.
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _results import ALLOCATORS, add_out_arguments, machine_record, results_path, write_results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"
MODES = {"fp32": ["fp32"], "bf16": ["bf16-autocast", "bf16-weights"]}
BATCH, CONTEXT_LEN, TIMESTEP = 2, 77, 999
WEIGHTS_FILE = "unet.safetensors"
# levers that only act under bfloat16 autocast: their rows run bf16-autocast instead of fp32
BF16_LEVERS = ("attention-no-upcast", "attention-upcast")


def unet_params(config_path, smoke):
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.load(config_path).model.params.unet_config.params)
    params["use_checkpoint"] = False
    if smoke:  # same graph, tiny widths: checks the plumbing in seconds
        params.update(model_channels=32, num_head_channels=8)
    return params


def build_ours(params):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**params)


def write_seeded_weights(params, path):
    """Our U-Net with seeded random weights, zero-initialised layers included, saved to ``path``."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_ours(params)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                torch.nn.init.normal_(param, std=0.02)
    save_file(model.state_dict(), str(path))


def load_weights(impl, params, path):
    """The model of ``impl`` built without initialisation and given the weights in ``path``."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    with torch.device("meta"):
        model = (build_diffusers if impl == "diffusers" else build_ours)(params)
    if impl == "diffusers":
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        sd = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()},
                                         dict(model.config))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def diffusers_kwargs(params):
    """UNet2DConditionModel arguments equivalent to an official UNetModel configuration."""
    channels = [params["model_channels"] * m for m in params["channel_mult"]]
    levels = len(channels)
    attends = [2 ** level in params["attention_resolutions"] for level in range(levels)]
    if params.get("num_head_channels", -1) > 0:
        heads = [ch // params["num_head_channels"] for ch in channels]
    else:
        heads = [params["num_heads"]] * levels
    return dict(
        sample_size=params["image_size"],
        in_channels=params["in_channels"],
        out_channels=params["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        block_out_channels=channels,
        layers_per_block=params["num_res_blocks"],
        # diffusers reads this list as the number of heads per level (a known misnomer)
        attention_head_dim=heads,
        cross_attention_dim=params["context_dim"],
        use_linear_projection=params.get("use_linear_in_transformer", False),
    )


def build_diffusers(params):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**diffusers_kwargs(params))


def current_rss_gb():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def precision_path(mode, force_bf16):
    """The ldm.precision decision for ``mode``: what --bf16 (autocast) or a use_bf16 config
    (weights) would run on this CPU. Returns (Precision, autocast_bf16, weights_bf16)."""
    from ldm.precision import choose_precision

    requested = torch.float32 if mode == "fp32" else torch.bfloat16
    chosen = choose_precision(requested, torch.device("cpu"), force=force_bf16,
                              requested_by=f"mode {mode}", force_hint="--force-bf16")
    bf16 = chosen.dtype == torch.bfloat16
    return chosen, bf16 and mode == "bf16-autocast", bf16 and mode == "bf16-weights"


def make_step(model, impl, size, weights_bf16, context_dim, channels_last=False):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(BATCH, 4, size, size, generator=gen)
    t = torch.full((BATCH,), TIMESTEP, dtype=torch.long)
    context = torch.randn(BATCH, CONTEXT_LEN, context_dim, generator=gen)
    if weights_bf16:
        x, context = x.bfloat16(), context.bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if impl == "diffusers":
        return lambda: model(x, t, encoder_hidden_states=context).sample
    return lambda: model(x, t, context=context)


def precision_context(autocast_bf16):
    if autocast_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def count_flops(step, autocast_bf16):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), precision_context(autocast_bf16), counter:
        step()
    return counter.get_total_flops()


def run_worker(args):
    """Times one (implementation, precision) over every size; prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.precision import host_cpu

    params = unet_params(args.config, args.smoke)
    mode, _, lever = args.mode.partition("+")
    levers = lever.split("+") if lever else []
    chosen, autocast_bf16, weights_bf16 = precision_path(mode, args.force_bf16)
    t0 = time.perf_counter()
    model = load_weights(args.impl, params, Path(args.workdir) / WEIGHTS_FILE)
    if weights_bf16:
        model = model.to(torch.bfloat16)
    from ldm.fast_inference import apply_lever
    for name in levers:
        if name not in ALLOCATORS:
            apply_lever(model, name)
    build_s = time.perf_counter() - t0
    info = {"impl": args.impl, "mode": args.mode, "path": chosen.path,
            "cpu_capability": host_cpu().capability, "build_s": build_s,
            "params": sum(p.numel() for p in model.parameters()),
            "model_rss_gb": current_rss_gb(), "threads": torch.get_num_threads(), "rows": []}
    for size in sorted(args.sizes):
        step = make_step(model, args.impl, size, weights_bf16, params["context_dim"],
                         channels_last="channels_last" in levers)
        flops = count_flops(step, autocast_bf16) if args.count_flops else None
        with torch.inference_mode(), precision_context(autocast_bf16):
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                out = step()
            warmup_s = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = step()
                times.append(time.perf_counter() - t0)
        reference = Path(args.workdir) / f"reference-{size}.pt"
        if args.impl == "ours" and args.mode == "fp32":
            torch.save(out.float(), reference)
        rel_err = None
        if reference.exists():
            ref = torch.load(reference, weights_only=True)
            rel_err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        info["rows"].append({"size": size, "flops": flops, "times_s": times, "warmup_s": warmup_s,
                             "rel_err": rel_err,
                             "median_s": statistics.median(times), "min_s": min(times),
                             "out_dtype": str(out.dtype).replace("torch.", ""),
                             "out_finite": bool(torch.isfinite(out).all()),
                             "peak_rss_gb": peak_rss_gb()})
    print(json.dumps(info))


def spawn_worker(args, impl, mode, count):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", impl,
           "--mode", mode, "--config", str(args.config), "--workdir", str(args.workdir),
           "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--sizes", *map(str, args.sizes)]
    cmd += ["--count-flops"] if count else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--force-bf16"] if args.force_bf16 else []
    env = dict(os.environ)
    for lever in mode.split("+")[1:]:
        if lever in ALLOCATORS:
            env["LD_PRELOAD"] = ALLOCATORS[lever]
    print(f"... {impl} {mode}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"impl": impl, "mode": mode, "error": reason, "rows": []}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results, machine):
    native = ", ".join(machine["native_half"]) or "none"
    print(f"CPU: {machine['cpu']}; PyTorch CPU kernels: {machine['cpu_capability']}; "
          f"native half types: {native} (from {machine['native_half_from']})")
    head = (f"{'impl':<10} {'precision':<22} {'path':<22} {'latent':>7} {'s/step':>8} {'min s':>8} "
            f"{'GFLOP':>8} {'TFLOP/s':>8} {'rel err':>9} {'peak RSS GB':>12}")
    print(head)
    print("-" * len(head))
    for res in results:
        path = res.get("path", "-")
        if res.get("error"):
            print(f"{res['impl']:<10} {res['mode']:<22} {path:<22} failed: {res['error']}")
        for row in res["rows"]:
            gflop = f"{row['flops'] / 1e9:.0f}" if row.get("flops") else "-"
            tflops = f"{row['tflops']:.3f}" if row.get("tflops") else "-"
            rel_err = f"{row['rel_err']:.1e}" if row.get("rel_err") is not None else "-"
            print(f"{res['impl']:<10} {res['mode']:<22} {path:<22} {row['size']:>4}^2 "
                  f"{row['median_s']:>8.2f} {row['min_s']:>8.2f} {gflop:>8} {tflops:>8} {rel_err:>9} "
                  f"{row['peak_rss_gb']:>12.2f}")


def run_all(args):
    impls = list(args.impls)
    notes = []
    if "diffusers" in impls and importlib.util.find_spec("diffusers") is None:
        impls.remove("diffusers")
        notes.append("diffusers is not importable: peer skipped")
    modes = [mode for dtype in args.dtypes for mode in MODES[dtype]]
    results = []
    with tempfile.TemporaryDirectory(prefix="unet_step-") as workdir:
        args.workdir = workdir
        print("... writing the seeded weights", file=sys.stderr, flush=True)
        write_seeded_weights(unet_params(args.config, args.smoke), Path(workdir) / WEIGHTS_FILE)
        # our eager fp32 runs first: it writes the reference outputs every other row is compared with
        runs = [("ours", mode) for mode in ["fp32"] + [m for m in modes if m != "fp32"]
                + [f"{'bf16-autocast' if lever in BF16_LEVERS else 'fp32'}+{lever}" for lever in args.levers]
                if "ours" in impls]
        runs += [(impl, mode) for impl in impls if impl != "ours" for mode in modes]
        missing = {name for lever in args.levers for name in lever.split("+")
                   if name in ALLOCATORS and not Path(ALLOCATORS[name]).exists()}
        if missing:
            notes.append(f"not installed, skipped: {', '.join(sorted(missing))}")
            runs = [(impl, mode) for impl, mode in runs if not missing & set(mode.split("+"))]
        results = run_workers(args, runs)
    return report_all(args, results, notes)


def run_workers(args, runs):
    """One worker process per (implementation, mode); FLOPs are counted in each implementation's first."""
    results, flops, counted = [], {}, set()
    for impl, mode in runs:
        res = spawn_worker(args, impl, mode, count=impl not in counted)
        counted.add(impl)
        for row in res["rows"]:
            flops.setdefault(row["size"], row["flops"])
            row["flops"] = flops.get(row["size"])
            row["tflops"] = row["flops"] / row["median_s"] / 1e12 if row["flops"] else None
        results.append(res)
    return results


def report_all(args, results, notes):
    machine = machine_record()
    if any(res.get("path") == "fp32 fallback" for res in results):
        notes.append("no native bf16 on this CPU: the bf16 rows ran float32, as --bf16 would; "
                     "--force-bf16 times emulated bf16 (often 100x slower)")
    print_table(results, machine)
    for note in notes:
        print(f"note: {note}")
    report = {"command": " ".join(["python", "bench/unet_step.py", *sys.argv[1:]]),
              "what": "one U-Net forward, CFG batch 2, context [2, 77, D], median of repeats "
                      "after warm-up; FLOPs from FlopCounterMode",
              "config": str(Path(args.config).resolve().relative_to(REPO))
              if Path(args.config).resolve().is_relative_to(REPO) else str(args.config),
              "smoke": args.smoke, "sizes": args.sizes, "repeats": args.repeats,
              "warmup": args.warmup, "force_bf16": args.force_bf16, "machine": machine,
              "notes": notes,
              "results": results}
    write_results(args.out, report)
    return 1 if any(res.get("error") for res in results) else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="latent side lengths")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(MODES))
    p.add_argument("--impls", nargs="+", default=["ours", "diffusers"], choices=["ours", "diffusers"])
    p.add_argument("--levers", nargs="*", default=[], metavar="LEVER",
                   help="also time our fp32 U-Net with each of these speed levers alone (ldm.fast_inference), "
                        "or several joined by '+' (winograd-all+tcmalloc)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per shape (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--smoke", action="store_true", help="tiny widths, to check the script itself")
    p.add_argument("--force-bf16", action="store_true",
                   help="time bf16 even on a CPU without native bf16 (emulated: often 100x slower); "
                        "without it such a CPU runs the bf16 rows in float32, as --bf16 would")
    add_out_arguments(p, "unet_step")
    # internal: one worker process per (implementation, precision)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.sizes) < 8 or any(s % 8 for s in args.sizes):
        p.error("--repeats must be >= 1, --warmup >= 0, and every size a multiple of 8")
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.worker:
        run_worker(args)
        return 0
    try:
        args.out = results_path(args.out, args.force, "unet_step")   # refused before minutes of work
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
