"""The full-size Stable Diffusion VAE on the CPU: decode speed beside diffusers, and what tiling costs
and saves at 1024px.

    PYTHONPATH=/tmp/peer_diffusers python bench/vae_decode.py [--repeats 3] [--parts speed tiling sweep shipped]
                                                              [--out bench/results/vae_decode.json --force]
    python bench/vae_decode.py --smoke          # tiny widths: checks the script in seconds

The VAE is built from the `first_stage_config` of configs/stable-diffusion/v2-inference.yaml (the
same VAE as SD 1.x) with seeded random weights, which are written once to a temporary
safetensors file; diffusers' AutoencoderKL loads the same weights through diffusers' own key
converter (`convert_ldm_vae_checkpoint`). Every run below is its own process, so its peak RSS is
its own.

1. Speed: decode of one seeded latent [1, 4, S/8, S/8] (S = --size, 512), median of --repeats
   after --warmup, for ours in float32 and with each lever (channels_last memory format for the
   weights and the input, or the input only (oneDNN then reorders the weights per call); SiLU and
   the residual sum in place; the math attention kernel instead of SDPA; 3x3 convolutions by Winograd's
   F(4x4, 3x3) (ldm.modules.winograd, default 1 GiB cache budget); jemalloc or tcmalloc
   preloaded; bfloat16 autocast or weights where ldm.precision finds native bfloat16), and
   diffusers in float32. Each output is compared with ours in float32: max abs diff, and PSNR of
   the images as saved ((x + 1) / 2 clamped to [0, 1]).
2. Tiling: an untiled decode at --native (768 px: the largest size "auto" leaves untiled), and
   decode of a --large latent (1024 px) untiled and tiled (ldm.models.tiled_vae, default
   tiling, and with GroupNorm statistics from a shrunk preview run), and diffusers' own tiled decode; peak RSS, time, and PSNR against our untiled decode.
   At --size, tiled with half-size tiles, so that there are seams to measure. Encode of a
   --large image untiled and tiled: the latents' difference.
3. sweep (not run by default): other tile sizes and overlaps, and tiles with their own GroupNorm statistics
   instead of the whole image's, at --large.
4. The shipped shapes VAE (trained, so its statistics are those of real images): a 256 px mosaic
   of 16 shape images decoded untiled and with 128 and 64 px tiles; GroupNorm statistics of the whole
   image (two passes), of a shrunk preview, or per tile.
"""
import argparse
import functools
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _results import add_out_arguments, checked_results_path, machine_record, write_results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"
SPEED_LEVERS = ["fp32", "channels_last", "channels_last_input", "inplace", "attn_math", "jemalloc", "tcmalloc",
                "channels_last_input+tcmalloc", "winograd", "winograd+tcmalloc", "bf16_autocast",
                "bf16_autocast+channels_last",
                "bf16_autocast+channels_last_input", "bf16_autocast+channels_last_input+tcmalloc",
                "bf16_weights", "bf16_weights+channels_last"]
# allocators a lever preloads into the worker (Debian's libjemalloc2 and libtcmalloc-minimal4)
ALLOCATORS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
# the sweep's tilings: (tile, overlap, image_norms), sides in pixels
SWEEP = [(512, 64, True), (512, 192, True), (384, 128, True), (640, 128, True), (512, 128, False),
         (512, 192, False)]
SMOKE_TILING = (64, 32, True)


# ------------------------------------------------------------------------------------------ models

def vae_config(config_path, smoke):
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.load(config_path).model.params.first_stage_config.params)
    if smoke:  # same graph, tiny widths
        params["ddconfig"]["ch"] = 32
    return params


def build_ours(params):
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(**params)


def diffusers_config(params):
    dd = params["ddconfig"]
    channels = [dd["ch"] * m for m in dd["ch_mult"]]
    return dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], latent_channels=dd["z_channels"],
                down_block_types=["DownEncoderBlock2D"] * len(channels),
                up_block_types=["UpDecoderBlock2D"] * len(channels), block_out_channels=channels,
                layers_per_block=dd["num_res_blocks"], sample_size=512)


def load_weights(impl, params, weights):
    """Our or diffusers' AutoencoderKL holding the weights in ``weights`` (built on the meta device
    and assigned, so the weights are in memory once)."""
    from safetensors.torch import load_file

    state = load_file(weights)
    if impl == "diffusers":
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        config = diffusers_config(params)
        state = convert_ldm_vae_checkpoint(state, config)
        with torch.device("meta"):
            model = AutoencoderKL(**config)
    else:
        with torch.device("meta"):
            model = build_ours(params)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def apply_levers(model, impl, levers):
    """``model`` with the levers applied; returns (model, autocast dtype or None, input dtype, path)."""
    from ldm.precision import choose_precision

    autocast, dtype, path = None, torch.float32, "fp32"
    if "bf16_autocast" in levers or "bf16_weights" in levers:
        chosen = choose_precision(torch.bfloat16, torch.device("cpu"), requested_by="the bf16 lever")
        path = chosen.path
        if chosen.dtype == torch.bfloat16 and "bf16_autocast" in levers:
            autocast = torch.bfloat16
        elif chosen.dtype == torch.bfloat16:
            model, dtype = model.to(torch.bfloat16), torch.bfloat16
    if "channels_last" in levers:
        model = model.to(memory_format=torch.channels_last)
    if "inplace" in levers:
        from ldm.modules.diffusionmodules.model import ResnetBlock

        for module in model.modules():
            if isinstance(module, ResnetBlock):
                module.forward = functools.partial(inplace_resnet_forward, module)
    if "winograd" in levers:
        from ldm.modules.winograd import use_winograd

        use_winograd(model)
    if "attn_math" in levers:
        from ldm.modules.diffusionmodules.model import AttnBlock

        for module in model.modules():
            if isinstance(module, AttnBlock):
                module.attn_backend = "math"
    return model, autocast, dtype, path


def inplace_resnet_forward(block, x, temb):
    """ResnetBlock.forward (inference, no time embedding) with SiLU and the residual sum in place:
    three fewer activation-sized allocations per block."""
    h = block.conv1(F.silu(block.norm1(x), inplace=True))
    h = block.conv2(F.silu(block.norm2(h), inplace=True))
    if block.in_channels != block.out_channels:
        x = block.conv_shortcut(x) if block.use_conv_shortcut else block.nin_shortcut(x)
    return h.add_(x)


# ------------------------------------------------------------------------------------------ worker

def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def current_rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def loaded_allocator():
    """The preloaded allocator this process really runs with (None: glibc malloc)."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    return next((name for name, lib in ALLOCATORS.items() if lib.split(".so")[0] in maps), None)


def tiling_from(spec):
    from ldm.models.tiled_vae import Tiling

    tile, overlap, image_norms, *preview = spec
    return Tiling(tile, overlap, bool(image_norms), bool(preview and preview[0]))


def make_call(model, impl, job, autocast, dtype):
    """The timed call of ``job``: decode or encode, tiled or not."""
    from ldm.models import tiled_vae

    x = torch.load(job["input"], weights_only=True).to(dtype)
    if {"channels_last", "channels_last_input"} & set(job["levers"]):
        x = x.contiguous(memory_format=torch.channels_last)
    tiling = tiling_from(job["tiling"]) if job.get("tiling") else None
    if impl == "diffusers":
        if tiling is not None:
            model.enable_tiling()
        if job["op"] == "decode":
            return lambda: model.decode(x).sample
        return lambda: model.encode(x).latent_dist.mean
    if job["op"] == "decode":
        if tiling is not None:
            return lambda: tiled_vae.tiled_decode(model, x, tiling)
        return lambda: model.decode(x)
    if tiling is not None:
        return lambda: tiled_vae.tiled_encode(model, x, tiling).mean
    return lambda: model.encode(x).mean


def run_worker(job):
    """One job (a JSON dict): load, apply levers, warm up, time; prints one JSON line and saves the
    output to job["output"]."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    model = load_weights(job["impl"], job["params"], job["weights"])
    model, autocast, dtype, path = apply_levers(model, job["impl"], job["levers"])
    load_s, model_rss = time.perf_counter() - t0, current_rss_gb()
    call = make_call(model, job["impl"], job, autocast, dtype)
    context = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    times = []
    with torch.inference_mode(), context:
        for i in range(job["warmup"] + job["repeats"]):
            t0 = time.perf_counter()
            out = call()
            if i >= job["warmup"]:
                times.append(time.perf_counter() - t0)
    torch.save(out.float().contiguous(), job["output"])
    print(json.dumps({"path": path, "allocator": loaded_allocator(), "load_s": load_s, "model_rss_gb": model_rss, "times_s": times,
                      "median_s": statistics.median(times), "peak_rss_gb": peak_rss_gb(),
                      "threads": torch.get_num_threads()}))


def spawn(job, workdir, name):
    job = dict(job, output=str(Path(workdir) / f"{name}.pt"))
    print(f"... {name}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    for lever in job["levers"]:
        if lever in ALLOCATORS:
            env["LD_PRELOAD"] = ALLOCATORS[lever]
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"name": name, "error": reason}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), name=name, output=job["output"])


# ------------------------------------------------------------------------------------------ comparisons

def image_psnr(a, b):
    """PSNR in dB of two decoded images as saved: (x + 1) / 2 clamped to [0, 1]."""
    a, b = ((a + 1) / 2).clamp(0, 1), ((b + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def compare(row, reference, kind="image"):
    """Add the difference between ``row``'s output and ``reference``'s to ``row``."""
    if row.get("error") or reference.get("error"):
        return row
    a = torch.load(row["output"], weights_only=True)
    b = torch.load(reference["output"], weights_only=True)
    row["vs"] = reference["name"]
    row["max_abs_diff"] = (a - b).abs().max().item()
    if kind == "image":
        row["psnr_db"] = image_psnr(a, b)
    else:   # latents: error relative to the reference's spread
        row["rel_rmse"] = ((a - b).pow(2).mean().sqrt() / b.std()).item()
    return row


# ------------------------------------------------------------------------------------------ runs

def write_inputs(args, params, workdir):
    """Seeded weights (safetensors) and inputs (.pt) in ``workdir``; returns their paths."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_ours(params)
    weights = Path(workdir) / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    del model
    gen = torch.Generator().manual_seed(1)
    paths = {"weights": str(weights)}
    for name, size in (("small", args.size), ("native", args.native), ("large", args.large)):
        path = Path(workdir) / f"latent_{name}.pt"
        torch.save(torch.randn(1, 4, size // 8, size // 8, generator=gen), path)
        paths[f"latent_{name}"] = str(path)
    path = Path(workdir) / "image_large.pt"
    torch.save(smooth_image(args.large, gen), path)
    paths["image_large"] = str(path)
    return paths


def smooth_image(size, gen):
    """An image in [-1, 1] with content at every scale: a sum of random sinusoids, plus fine noise."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.zeros(3, size, size)
    for octave in range(1, 6):
        for channel in range(3):
            fy, fx, phase = (torch.rand(3, generator=gen) * torch.tensor([2 ** octave, 2 ** octave, 6.3])).tolist()
            image[channel] += torch.sin(2 * math.pi * (fy * ys + fx * xs) + phase) / octave
    image += 0.05 * torch.randn(3, size, size, generator=gen)
    return (image / image.abs().max())[None]


def base_job(args, params, paths):
    return {"params": params, "weights": paths["weights"], "repeats": args.repeats, "warmup": args.warmup,
            "threads": args.threads, "levers": ["fp32"], "impl": "ours", "op": "decode"}


def speed_runs(args, params, paths, workdir, impls):
    base = dict(base_job(args, params, paths), input=paths["latent_small"])
    # a Winograd row's first decode only plans which filters to cache, its second transforms them: warm up both
    rows = [spawn(dict(base, levers=lever.split("+"), warmup=base["warmup"] + ("winograd" in lever.split("+"))),
                  workdir, f"ours-{lever}") for lever in args.levers]
    if "diffusers" in impls:
        rows.append(spawn(dict(base, impl="diffusers"), workdir, "diffusers-fp32"))
    for row in rows[1:]:
        compare(row, rows[0])
    return rows


def tiling_runs(args, params, paths, workdir, impls, tiling):
    """Untiled and tiled decode at --large and --size, and encode at --large (each once after a warm-up
    that is the same call: the tiled peak is then its own)."""
    base = dict(base_job(args, params, paths), repeats=1, warmup=0)
    large = dict(base, input=paths["latent_large"])
    small = dict(base, input=paths["latent_small"])
    half = (tiling[0] // 2, tiling[1] // 2, tiling[2])
    encode = dict(base, op="encode", input=paths["image_large"])

    def run(job, name, spec=None, reference=None, kind="image"):
        row = spawn(dict(job, tiling=spec), workdir, name)
        row["tiling"] = spec_label(spec)
        return compare(row, reference, kind) if reference is not None else row

    native = run(dict(base, input=paths["latent_native"]), f"decode-{args.native}-auto-limit")
    untiled = run(large, f"decode-{args.large}-untiled")
    rows = [native, untiled, run(large, f"decode-{args.large}-tiled", tiling, untiled),
            run(large, f"decode-{args.large}-tiled-preview-norms", (*tiling[:2], True, True), untiled),
            # as sampling runs it on a CPU with native bfloat16 (full-size models autocast to bfloat16)
            run(dict(large, levers=["bf16_autocast", "channels_last_input"]),
                f"decode-{args.large}-tiled-bf16-channels_last", tiling, untiled)]
    if "diffusers" in impls:
        # diffusers' enable_tiling(): its own 512 px tiles, 25 % overlap, per-tile GroupNorm
        rows.append(run(dict(large, impl="diffusers"), f"decode-{args.large}-diffusers-tiled", tiling, untiled))
        rows[-1]["tiling"] = "diffusers' own"
    small_untiled = run(small, f"decode-{args.size}-untiled")
    rows += [small_untiled, run(small, f"decode-{args.size}-tiled-{half[0]}px", half, small_untiled)]
    enc_untiled = run(encode, f"encode-{args.large}-untiled")
    rows += [enc_untiled, run(encode, f"encode-{args.large}-tiled", tiling, enc_untiled, kind="latent")]
    return rows


def spec_label(spec):
    """tile/overlap px and whose GroupNorm statistics, or "untiled"."""
    if spec is None:
        return "untiled"
    norms = "preview norms" if spec[2] and len(spec) > 3 and spec[3] else "image norms" if spec[2] else "tile norms"
    return f"{spec[0]}/{spec[1]} {norms}"


def sweep_runs(args, params, paths, workdir, tiling_rows):
    base = dict(base_job(args, params, paths), repeats=1, warmup=0, input=paths["latent_large"])
    name = f"decode-{args.large}-untiled"
    reference = next((r for r in tiling_rows if r["name"] == name), None)
    rows = [] if reference is not None else [spawn(base, workdir, name)]
    reference = reference or rows[0]
    for spec in SWEEP:
        row = spawn(dict(base, tiling=spec), workdir, f"decode-{args.large}-sweep-{len(rows)}")
        rows.append(compare(dict(row, tiling=spec_label(spec)), reference))
    return rows


def shipped_vae_seams():
    """The shipped (trained) shapes VAE on a 256 px mosaic of 16 shape images: PSNR of tiled against
    untiled decode, with whole-image and per-tile GroupNorm statistics."""
    import numpy as np

    from ldm.checkpoint import load_model
    from ldm.data.shapes import render, sample_attributes
    from ldm.models import tiled_vae

    vae = load_model(None, None, device="cpu").first_stage_model
    rng = np.random.default_rng(0)
    images = [np.asarray(render(sample_attributes(rng), size=64, rng=rng)) for _ in range(16)]
    mosaic = np.concatenate([np.concatenate(images[i:i + 4], axis=1) for i in range(0, 16, 4)], axis=0)
    x = torch.from_numpy(mosaic.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    rows = []
    with torch.inference_mode():
        z = vae.encode(x).mode()
        untiled = vae.decode(z)
        for tile, overlap in ((128, 32), (64, 32)):
            for spec in ((tile, overlap, True), (tile, overlap, True, True), (tile, overlap, False)):
                tiled = tiled_vae.tiled_decode(vae, z, tiling_from(spec))
                rows.append({"tiling": spec_label(spec), "image": "256 px mosaic",
                             "psnr_db": image_psnr(tiled, untiled)})
    return rows


# ------------------------------------------------------------------------------------------ report

def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def print_tables(report):
    speed = report["speed"]
    if not speed:
        return print_tiling_tables(report)
    base = next((r["median_s"] for r in speed if r["name"] == "ours-fp32" and not r.get("error")), None)
    peer = next((r["median_s"] for r in speed if r["name"] == "diffusers-fp32" and not r.get("error")), None)
    print(f"decode {report['size']}px (latent {report['size'] // 8}^2, batch 1), median of {report['repeats']}")
    head = f"{'run':<48} {'path':<14} {'s':>7} {'x ours fp32':>11} {'x diffusers':>11} {'max abs diff':>12} {'PSNR dB':>8} {'peak GB':>8}"
    print(head + "\n" + "-" * len(head))
    for r in speed:
        if r.get("error"):
            print(f"{r['name']:<48} failed: {r['error']}")
            continue
        print(f"{r['name']:<48} {r['path']:<14} {r['median_s']:>7.2f} {fmt(base and r['median_s'] / base, '.2f'):>11} "
              f"{fmt(peer and r['median_s'] / peer, '.2f'):>11} {fmt(r.get('max_abs_diff'), '.2e'):>12} "
              f"{fmt(r.get('psnr_db'), '.1f'):>8} {r['peak_rss_gb']:>8.2f}")
    print()
    print_tiling_tables(report)


def print_tiling_tables(report):
    head = f"{'run':<48} {'tiling (tile/overlap px)':<32} {'s':>7} {'peak GB':>8} {'PSNR dB':>8} {'rel rmse':>9}"
    print(head + "\n" + "-" * len(head))
    for r in report["tiling"] + report.get("sweep", []):
        if r.get("error"):
            print(f"{r['name']:<48} failed: {r['error']}")
            continue
        print(f"{r['name']:<48} {r['tiling']:<32} {r['median_s']:>7.2f} {r['peak_rss_gb']:>8.2f} "
              f"{fmt(r.get('psnr_db'), '.1f'):>8} {fmt(r.get('rel_rmse'), '.2e'):>9}")
    for r in report.get("shipped_vae", []):
        print(f"shipped VAE, {r['image']}, tiles {r['tiling']}: PSNR {r['psnr_db']:.1f} dB")


def run_all(args):
    from ldm.models.tiled_vae import OVERLAP_PIXELS, TILE_PIXELS

    params = vae_config(args.config, args.smoke)
    impls = list(args.impls)
    notes = []
    if "diffusers" in impls and importlib.util.find_spec("diffusers") is None:
        impls.remove("diffusers")
        notes.append("diffusers is not importable: peer skipped (see bench/README.md)")
    tiling = SMOKE_TILING if args.smoke else (TILE_PIXELS, OVERLAP_PIXELS, True)
    with tempfile.TemporaryDirectory(prefix="vae_decode_") as workdir:
        paths = write_inputs(args, params, workdir)
        report = {"what": "SD VAE decode/encode on the CPU, random seeded weights; every run its own process",
                  "config": str(Path(args.config).resolve().relative_to(REPO))
                  if Path(args.config).resolve().is_relative_to(REPO) else str(args.config),
                  "smoke": args.smoke, "size": args.size, "large": args.large, "repeats": args.repeats,
                  "warmup": args.warmup, "machine": machine_record(), "notes": notes}
        parts = set(args.parts)
        report["speed"] = speed_runs(args, params, paths, workdir, impls) if "speed" in parts else []
        report["tiling"] = tiling_runs(args, params, paths, workdir, impls, tiling) if "tiling" in parts else []
        if "sweep" in parts and not args.smoke:
            report["sweep"] = sweep_runs(args, params, paths, workdir, report["tiling"])
        if "shipped" in parts and not args.smoke:
            report["shipped_vae"] = shipped_vae_seams()
        for row in report["speed"] + report["tiling"] + report.get("sweep", []):
            row.pop("output", None)
    print_tables(report)
    for note in notes:
        print(f"note: {note}")
    write_results(args.out, report)
    failed = [r for r in report["speed"] + report["tiling"] + report.get("sweep", []) if r.get("error")]
    return 1 if failed else 0


def parse_args(argv=None):
    from ldm.cli import ArgumentParser   # bad flags: one line, exit 2

    p = ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size", type=int, default=512, help="image side of the speed runs (pixels)")
    p.add_argument("--native", type=int, default=768,
                   help="image side of one more untiled decode: the largest that --vae-tiling auto leaves untiled")
    p.add_argument("--large", type=int, default=1024, help="image side of the tiling runs (pixels)")
    p.add_argument("--levers", nargs="+", default=SPEED_LEVERS,
                   help="our speed runs, the first is the reference: " + ", ".join(SPEED_LEVERS))
    p.add_argument("--impls", nargs="+", default=["ours", "diffusers"], choices=["ours", "diffusers"])
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per speed run (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--parts", nargs="+", default=["speed", "tiling", "shipped"],
                   choices=["speed", "tiling", "sweep", "shipped"],
                   help="what to run: speed runs, tiling runs, the sweep of other tilings, the shipped VAE's seams")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--smoke", action="store_true", help="tiny widths and sizes, to check the script itself")
    add_out_arguments(p, "vae_decode")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.native, args.large = min(args.size, 64), min(args.native, 64), min(args.large, 128)
    known = {token for lever in SPEED_LEVERS for token in lever.split("+")}
    if any(token not in known for lever in args.levers for token in lever.split("+")):
        p.error(f"--levers takes {', '.join(sorted(known))} joined with '+'")
    if args.repeats < 1 or args.warmup < 0 or any(side % 64 for side in (args.size, args.native, args.large)):
        p.error("--repeats must be >= 1, --warmup >= 0, --size, --native and --large multiples of 64")
    return args


def _main(argv):
    args = parse_args(argv)
    args.out = checked_results_path(args.out, args.force, "vae_decode")   # refused before minutes of work
    return run_all(args)


def main(argv=None):
    sys.path.insert(0, str(REPO))
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        run_worker(json.loads(sys.argv[2]))
        return 0
    from ldm.cli import run

    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
