"""The opt-in approximate speed-ups (step caching, token merging, int8 Linear layers): what they save, what they cost.

    python bench/approx_speedups.py --out bench/results/approx_speedups.json --force    # the committed file
    python bench/approx_speedups.py --smoke                                              # checks the script

Every variant (``--variants``; ``exact`` always runs first, as the reference) is applied through the library's
``ldm.modules.speedups.approximated``, as the scripts' flags apply it. Two subjects:

- ``sd2``: the full-size SD 2.x model of configs/stable-diffusion/v2-inference.yaml (U-Net and VAE) with seeded
  random weights: the U-Net's zero-initialised layers get random ones and its output is scaled to unit spread,
  as in bench/samplers.py; the text encoder is left out and seeded random contexts [1, 77, 1024] stand in for
  the prompt and the negative prompt. One sampling run per variant (DDIM, ``--steps`` steps at scale 7.5, CFG
  batch 2, ``--size`` px, the same start noise): its wall time, and the PSNR of its decoded image against the
  exact run's. A random decoder has no colour scale, so every decoded image goes through the affine map that
  gives the exact image mean 0 and spread 0.5 in [-1, 1], then [0, 1] as the scripts save it. Then one U-Net
  forward per variant at ``--step-size`` px (CFG batch 2): the step time at the usual image size; for step
  caching, the time of a shallow step.
- ``shipped``: the shipped model with the scripts' defaults (``ldm.cli.shipped_sampling``): the fidelity table of
  bench/shapes_fidelity.py with each variant on, and its seconds per image.

Times are one run each on a machine that may be shared: ``--threads`` fixes torch's thread count.
"""
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, checked_results_path, machine_record, shown_path, write_results  # noqa: E402
from ldm.cli import OFFICIAL_DEFAULTS, ArgumentParser, run, shipped_sampling  # noqa: E402
from ldm.errors import UserError  # noqa: E402

SD2_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"
VARIANTS = {
    "exact": {},
    "deepcache-2": {"deepcache": 2},
    "deepcache-3": {"deepcache": 3},
    "deepcache-5": {"deepcache": 5},
    "deepcache-3-depth1": {"deepcache": 3, "deepcache_depth": 1},
    "tome-0.3": {"tome": 0.3},
    "tome-0.5": {"tome": 0.5},
    "int8": {"int8": True},
    "all": {"deepcache": 3, "tome": 0.5, "int8": True},
}
FIDELITY_COLUMNS = ("colour", "shape", "size", "position", "background", "colour+shape")


def psnr(a, b):
    """PSNR in dB of images in [0, 1] (inf when identical)."""
    error = float((a.float() - b.float()).pow(2).mean().sqrt())
    return math.inf if error == 0 else -20 * math.log10(error)


def relative_rmse(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def finite_or_none(value):
    return value if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# the full-size random-weight model

def random_sd2_model(smoke, seed):
    """LatentDiffusion of v2-inference.yaml without its text encoder, seeded random weights (tiny U-Net widths with
    ``smoke``), every zero-initialised U-Net layer given random weights and the output scaled to unit spread."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    config = OmegaConf.load(SD2_CONFIG).model
    config.params.update(cond_stage_config="__is_unconditional__", force_null_conditioning=True)
    config.params.unet_config.params.update(use_checkpoint=False, use_fp16=False)
    if smoke:   # same graph, tiny widths (as bench/unet_step.py --smoke)
        config.params.unet_config.params.update(model_channels=32, num_head_channels=8)
        config.params.first_stage_config.params.ddconfig.ch = 32
    torch.manual_seed(seed)
    model = instantiate_from_config(config).eval()
    unet = model.model.diffusion_model
    for module in unet.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    gen = torch.Generator().manual_seed(seed)
    context_dim = config.params.unet_config.params.context_dim
    with torch.no_grad():
        spread = model.apply_model(torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500]),
                                   torch.randn(1, 77, context_dim, generator=gen)).std()
        unet.out[-1].weight /= spread
        unet.out[-1].bias /= spread
    return model, context_dim


class FullSizeSubject:
    def __init__(self, smoke, seed, size, steps):
        self.model, context_dim = random_sd2_model(smoke, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.cond = torch.randn(1, 77, context_dim, generator=gen)
        self.uncond = torch.randn(1, 77, context_dim, generator=gen)
        self.x_T = torch.randn(1, 4, size // 8, size // 8, generator=gen)
        self.context_dim, self.seed, self.steps = context_dim, seed, steps
        self.scale = OFFICIAL_DEFAULTS["scale"]
        self.normalise = None

    def sample(self, options, bf16):
        """(latents, sampling seconds, seconds to apply ``options``: quantizing is paid per run) of one DDIM run,
        under the scripts' bfloat16 autocast with ``bf16``."""
        from ldm.generate import make_sampler, precision_scope, seed_everything
        from ldm.modules.speedups import approximated
        sampler = make_sampler("ddim", self.model)
        start = time.perf_counter()
        with torch.no_grad(), precision_scope(torch.device("cpu"), "autocast", bf16), \
                approximated(self.model, **options):
            setup = time.perf_counter() - start
            seed_everything(self.seed)
            start = time.perf_counter()
            latents, _ = sampler.sample(S=self.steps, conditioning=self.cond, batch_size=1,
                                        shape=list(self.x_T.shape[1:]), x_T=self.x_T, verbose=False,
                                        unconditional_guidance_scale=self.scale,
                                        unconditional_conditioning=self.uncond, progress=False)
            return latents, time.perf_counter() - start, setup

    def decode(self, latents):
        """Images [B, 3, H, W] in [0, 1]; the first call fixes the affine map (the exact image's mean and spread)."""
        with torch.no_grad():
            raw = self.model.decode_first_stage(latents).float()
        if self.normalise is None:
            self.normalise = (float(raw.mean()), float(raw.std()))
        mean, std = self.normalise
        return ((raw - mean) / std * 0.5 + 1).div(2).clamp(0, 1)

    def unet_step(self, options, side, repeats, bf16):
        """Seconds of one U-Net forward at [2, 4, side, side] (median of ``repeats`` after a warm-up), and for step
        caching, of a shallow step after a full one."""
        gen = torch.Generator().manual_seed(self.seed + 2)
        x = torch.randn(2, 4, side, side, generator=gen)
        t = torch.tensor([500, 500])
        context = torch.randn(2, 77, self.context_dim, generator=gen)
        from ldm.generate import precision_scope
        from ldm.modules.speedups import approximated
        times = []
        with torch.no_grad(), precision_scope(torch.device("cpu"), "autocast", bf16), \
                approximated(self.model, **options):
            listeners = vars(self.model).get("run_listeners", ())
            for i in range(repeats + 1):   # the first is the warm-up
                for listener in listeners:
                    listener.start_run()
                start = time.perf_counter()
                self.model.apply_model(x, t, context)
                seconds = time.perf_counter() - start
                if options.get("deepcache"):   # step 1 reuses the deep features of step 0
                    for listener in listeners:
                        listener.at_step(1)
                    start = time.perf_counter()
                    self.model.apply_model(x, t, context)
                    seconds = time.perf_counter() - start
                if i:
                    times.append(seconds)
        return statistics.median(times)


def measure_full_size(args, log):
    subject = FullSizeSubject(args.smoke, args.seed, args.size, args.steps)
    log(f"sd2: built ({sum(p.numel() for p in subject.model.model.parameters()) / 1e6:.0f} M U-Net parameters)")
    with torch.no_grad():   # warm-up: the first model call pays one-off allocation costs
        subject.model.apply_model(subject.x_T, torch.tensor([500]), subject.cond)
    from ldm.precision import autocast_dtype
    runs, steps, computes, first_exact = [], [], {}, None
    for precision in args.precisions:
        bf16 = precision == "bf16"
        dtype = autocast_dtype(torch.device("cpu"), "autocast", bf16)
        computes[precision] = str(dtype or torch.float32).removeprefix("torch.")
        exact = None
        for name in args.variants:
            latents, seconds, setup = subject.sample(VARIANTS[name], bf16)
            images = subject.decode(latents)
            exact = exact or (latents, images, seconds)
            first_exact = first_exact or exact
            runs.append({"precision": precision, "variant": name, "options": VARIANTS[name], "seconds": seconds,
                         "setup_seconds": setup, "speedup": exact[2] / seconds,
                         "psnr_db": finite_or_none(psnr(images, exact[1])),
                         "latent_relative_rmse": relative_rmse(latents, exact[0]),
                         "psnr_vs_first_exact_db": finite_or_none(psnr(images, first_exact[1]))})
            log(f"sd2 {precision} {name}: {seconds:.1f} s (+{setup:.1f} s setup), PSNR {runs[-1]['psnr_db']}")
        if args.step_size:
            for name in args.step_variants:
                seconds = subject.unet_step(VARIANTS[name], args.step_size // 8, args.repeats, bf16)
                steps.append({"precision": precision, "variant": name, "options": VARIANTS[name], "seconds": seconds,
                              "step": "shallow (deep features reused)" if VARIANTS[name].get("deepcache") else "full"})
                log(f"sd2 {precision} U-Net step {args.step_size}px {name}: {seconds:.2f} s")
    return {"config": shown_path(SD2_CONFIG), "smoke_widths": args.smoke, "size": args.size, "steps": args.steps,
            "precisions": computes,
            "sampler": "ddim", "scale": subject.scale, "latent_shape": list(subject.x_T.shape),
            "decode_normalisation": subject.normalise, "runs": runs,
            "unet_step": {"size": args.step_size, "batch": 2, "repeats": args.repeats, "rows": steps}}


# ---------------------------------------------------------------------------------------------
# the shipped model

def measure_shipped(args, log):
    from shapes_fidelity import measure, model_record

    from ldm.checkpoint import load_model, resolve_paths
    from ldm.data.shapes import ALL_PAIRS, pair_prompt_set, prompt_set
    config, ckpt = resolve_paths(None, None)
    model = load_model(config, ckpt, device="cpu")
    singles = prompt_set(args.prompts, seed=0)
    scenes = pair_prompt_set(ALL_PAIRS, args.pair_prompts) if args.pair_prompts else []
    sampling = {**shipped_sampling(), **({"steps": args.shipped_steps} if args.shipped_steps else {})}
    from ldm.generate import txt2img
    txt2img(model, singles[:args.batch], n_samples=args.batch, progress=False, **sampling)   # warm-up
    runs = []
    for name in args.variants:
        result = measure(model, {**sampling, **VARIANTS[name]}, singles, scenes, args.seeds, args.batch)
        result.pop("failures", None)
        result.pop("scene_failures", None)
        runs.append({"variant": name, "options": VARIANTS[name], **result})
        log(f"shipped {name}: {result['seconds_per_image']:.3f} s/image, colour+shape "
            f"{result['overall']['colour+shape']['accuracy']}")
    return {"model": model_record(config, ckpt), "sampling": sampling, "runs": runs}


# ---------------------------------------------------------------------------------------------
# reporting

def _cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def full_size_table(result):
    head = ["precision", "variant", "seconds", "speed-up", "setup s", "PSNR dB", "latent rel. RMSE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = result["runs"][0]["precision"]
    for r in result["runs"]:
        psnr_cell = _cell(r["psnr_db"], ".1f")
        if r["variant"] == "exact":
            psnr_cell = "exact" if r["precision"] == first \
                else f"{_cell(r['psnr_vs_first_exact_db'], '.1f')} vs {first}"
        lines.append(f"| {r['precision']} | {r['variant']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['setup_seconds']:.1f} | {psnr_cell} | {r['latent_relative_rmse']:.4f} |")
    return "\n".join(lines)


def step_table(result):
    rows = result["unet_step"]["rows"]
    exact = {r["precision"]: r["seconds"] for r in rows if r["variant"] == "exact"}
    lines = ["| precision | variant | step | seconds | vs exact |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{exact[r['precision']] / r['seconds']:.2f}x" if r["precision"] in exact else "-"
        lines.append(f"| {r['precision']} | {r['variant']} | {r['step']} | {r['seconds']:.2f} | {ratio} |")
    return "\n".join(lines)


def shipped_table(result):
    head = ["variant", "s/image", "speed-up", *FIDELITY_COLUMNS, "held-out colour+shape", "two shapes: both"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    exact = result["runs"][0]["seconds_per_image"]
    for r in result["runs"]:
        cells = [r["variant"], f"{r['seconds_per_image']:.3f}", f"{exact / r['seconds_per_image']:.2f}x"]
        cells += [_percent(r["overall"][c]["accuracy"]) for c in FIDELITY_COLUMNS]
        cells.append(_percent(r["held_out_pairs"]["colour+shape"]["accuracy"]))
        cells.append(_percent(r["scenes"]["overall"]["both shapes"]["accuracy"]) if "scenes" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(accuracy):
    return "-" if accuracy is None else f"{100 * accuracy:.1f}%"


def print_report(report):
    machine = report["machine"]
    print(f"CPU: {machine['cpu']} ({machine['cpu_capability']}), torch {machine['torch']}, "
          f"{machine['threads']} threads")
    if "sd2" in report:
        sd2 = report["sd2"]
        computes = ", ".join(f"{name} computes {dtype}" for name, dtype in sd2["precisions"].items())
        print(f"\nsd2 random weights{' (smoke widths)' if sd2['smoke_widths'] else ''}: {sd2['size']} px, "
              f"{sd2['steps']} DDIM steps, scale {sd2['scale']:g}, CFG batch 2 ({computes}); seconds of the sampling "
              f"run, PSNR of the decoded image vs the exact run of its precision\n")
        print(full_size_table(sd2))
        if sd2["unet_step"]["rows"]:
            print(f"\none U-Net forward at {sd2['unet_step']['size']} px, CFG batch 2\n")
            print(step_table(sd2))
    if "shipped" in report:
        shipped = report["shipped"]
        settings = shipped["runs"][0]["settings"]
        print(f"\nshipped model: {settings['images']} images, {settings['sampler']} {settings['steps']} steps, scale "
              f"{settings['scale']:g}; fidelity over all prompts\n")
        print(shipped_table(shipped))
    print(f"\nwall time {report['wall_seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sd2", "shipped"], choices=["sd2", "shipped"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="what to measure (exact always runs first)")
    p.add_argument("--size", type=int, default=256, help="sd2: image size of the sampling runs (px)")
    p.add_argument("--steps", type=int, default=20, help="sd2: DDIM steps of the sampling runs")
    p.add_argument("--step-size", type=int, default=512, help="sd2: image size of the U-Net step timing (0: none)")
    p.add_argument("--step-variants", nargs="+", choices=list(VARIANTS),
                   default=["exact", "deepcache-3", "deepcache-3-depth1", "tome-0.3", "tome-0.5", "int8"],
                   help="sd2: variants of the U-Net step timing")
    p.add_argument("--repeats", type=int, default=1, help="sd2: timed U-Net steps per variant after a warm-up")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="sd2: float32, and/or the scripts' bfloat16 autocast (float32 where the CPU lacks native "
                        "bfloat16); each precision's exact run is its reference")
    p.add_argument("--prompts", type=int, default=216, help="shipped: one-shape prompts (>= 18)")
    p.add_argument("--pair-prompts", type=int, default=72, help="shipped: two-shape prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="shipped: one image per prompt per seed")
    p.add_argument("--batch", type=int, default=36, help="shipped: images per batch")
    p.add_argument("--shipped-steps", type=int, default=None, help="shipped: sampling steps (default: the scripts')")
    p.add_argument("--seed", type=int, default=0, help="sd2: seed of the weights, contexts and start noise")
    p.add_argument("--smoke", action="store_true",
                   help="check the script: tiny sd2 widths at 64 px, 3 steps, a 128 px step; 18 shipped prompts at "
                        "3 steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_out_arguments(p, "approx_speedups")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.step_size = 64, 3, 128
        args.prompts, args.pair_prompts, args.seeds, args.batch, args.shipped_steps = 18, 0, [0], 18, 3
    args.variants = ["exact", *dict.fromkeys(v for v in args.variants if v != "exact")]
    if args.size % 64 or args.size < 64 or args.step_size % 64 or args.step_size < 0:
        raise UserError(f"--size and --step-size must be multiples of 64 (0 for no step timing), got "
                        f"{args.size} and {args.step_size}")
    if min(args.steps, args.repeats, args.batch, args.shipped_steps or 1) < 1 or args.prompts < 18 \
            or args.pair_prompts < 0:
        raise UserError("--steps, --shipped-steps, --repeats and --batch must be at least 1, --prompts at least 18")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    return args


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = checked_results_path(args.out, args.force, "approx_speedups")   # refused before minutes of work
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    report = {"command": shlex.join(["python", "bench/approx_speedups.py", *argv]), "machine": machine_record(),
              "variants": {name: VARIANTS[name] for name in args.variants}}
    if "sd2" in args.models:
        report["sd2"] = measure_full_size(args, log)
    if "shipped" in args.models:
        report["shipped"] = measure_shipped(args, log)
    report["wall_seconds"] = time.perf_counter() - started
    print_report(report)
    write_results(out, report)
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
