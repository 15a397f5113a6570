"""How close does each sampler get to a converged sample in 10, 20 and 30 steps, and how fast?

Every run starts from the same start noise x_T (txt2img-style: the sigma samplers scale it by
their first sigma, DDIM, PLMS and DPM-Solver++ use it as is) and is compared with a 250-step
DDIM run from that noise, the reference. Two subjects:

- the shipped model (default), a handful of prompts from the shapes benchmark set at its CLI
  scale 4: RMSE and PSNR of the decoded images in [0, 1] pixel space, and the latent RMSE;
- a full-size SD 2.x U-Net (``unet_config`` of configs/stable-diffusion/v2-inference.yaml) with
  seeded random weights at 8x8 latents and random cross-attention context [1, 77, 1024], at the
  official scale 7.5: latent RMSE only (there is no decoder). Its zero-initialised output layers
  get random weights too, scaled so the eps output has unit spread, or every sampler would
  return x_T.

The stochastic samplers (ancestral, SDE, DDPM, LCM) draw fresh noise, so they approach a sample
of their own rather than the reference: their distance is not expected to fall to zero. The
reference itself ends, as the official DDIM does, at alphas_cumprod[0] (sigma ~0.03), not at x0:
a sampler that ends at sigma = 0 stays about that leftover noise away from it however well it
converges. The table header gives that floor (reference vs its own final x0 estimate). A
deterministic sampler whose distance grows with steps, to above twice the floor, is listed under
"notes".

    python bench/samplers.py                    # every sampler x schedule on the shipped model + SD 2.x core set
    python bench/samplers.py --quick            # fewer schedules on the shipped model
    python bench/samplers.py --threads 1 --out bench/results/samplers.json --force   # the committed file
    python bench/samplers.py --smoke --samplers ddim euler --steps 2               # checks the script

Images per second are the sampling (and, for the shipped model, decoding) wall time of each run;
on a shared machine they vary with its load, which ``--threads 1`` keeps steadier.
"""
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, checked_results_path, machine_record, shown_path, write_results  # noqa: E402
from ldm.cli import OFFICIAL_DEFAULTS, SHIPPED_DEFAULTS, ArgumentParser, run  # noqa: E402
from ldm.errors import UserError  # noqa: E402
from ldm.models.diffusion.k_sampling import STOCHASTIC_SAMPLERS  # noqa: E402
from ldm.models.diffusion.samplers import (SAMPLER_BY_NAME, SAMPLERS, SCHEDULE_LABELS,  # noqa: E402
                                           resolve_sampler, resolve_schedule)

SD2_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"
SCHEDULES = tuple(SCHEDULE_LABELS)
# the full-size U-Net costs ~2 s a step on two cores whatever the batch (its weights dominate), so it
# runs a subset: "core" (~14 min) keeps the default run near 25 minutes, "all" is the subset (~35 min)
FULL_SIZE_CORE = ("ddim", "euler", "dpmpp_2m", "unipc_bh1")
FULL_SIZE_SCHEDULE_STEPS = {"core": 10, "all": 20}
# one random "prompt" (CFG batch 2): a second one would add ~15% to every step for no new information
FULL_SIZE_BATCH = 1


@dataclass(frozen=True)
class Run:
    sampler: str
    schedule: object   # a SCHEDULE_LABELS id, or None for DDIM, PLMS and DPM-Solver++
    steps: int


# ---------------------------------------------------------------------------------------------
# which runs

def _sampler_schedules(sampler, schedules):
    """The schedules ``sampler`` can run among ``schedules`` ([None] for the timestep samplers)."""
    return list(schedules) if SAMPLER_BY_NAME[sampler].uses_sigmas else [None]


def _unique(pairs):
    return list(dict.fromkeys(pairs))


def shipped_pairs(quick, samplers, schedules):
    """(sampler, schedule) pairs on the shipped model: every sampler on every schedule, or with
    ``quick`` every sampler on its default schedule and Karras plus every schedule with Euler
    and DPM++ 2M."""
    if not quick:
        return [(s, sch) for s in samplers for sch in _sampler_schedules(s, schedules)]
    pairs = []
    for s in samplers:
        info = SAMPLER_BY_NAME[s]
        wanted = [info.default_schedule, "karras"] if info.uses_sigmas else [None]
        pairs += [(s, sch) for sch in wanted if sch is None or sch in schedules]
    pairs += [(s, sch) for s in ("euler", "dpmpp_2m") if s in samplers for sch in schedules]
    return _unique(pairs)


def full_size_runs(size_set, samplers, schedules, steps):
    """The full-size subset: samplers at their default schedule at ``steps`` ("core": only
    FULL_SIZE_CORE), then DPM++ 2M once on every other schedule."""
    chosen = [s for s in samplers if size_set == "all" or s in FULL_SIZE_CORE]
    runs = [Run(s, SAMPLER_BY_NAME[s].default_schedule or None, n) for s in chosen for n in steps]
    if "dpmpp_2m" in samplers:
        n = min(FULL_SIZE_SCHEDULE_STEPS[size_set], max(steps))
        runs += [Run("dpmpp_2m", sch, n) for sch in schedules]
    return _unique(runs)


# ---------------------------------------------------------------------------------------------
# what is sampled

@dataclass
class Subject:
    """A model with its conditioning, start noise and (optionally) decoder, ready to sample."""
    name: str
    model: object
    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float
    x_T: torch.Tensor                   # [B, C, h, w]
    decode: object = None               # latents -> images [B, 3, H, W] in [0, 1], or None

    def sample(self, run, seed):
        """(latents, images or None, seconds, extra) of ``run``, seeded like txt2img right before
        sampling; ``extra`` is what the sampler returns beside the latents (DDIM: its intermediates)."""
        from ldm.generate import make_sampler, seed_everything
        sampler = make_sampler(run.sampler, self.model, schedule=run.schedule)
        seed_everything(seed)
        start = time.perf_counter()
        latents, extra = sampler.sample(S=run.steps, conditioning=self.cond, batch_size=self.x_T.shape[0],
                                    shape=list(self.x_T.shape[1:]), unconditional_guidance_scale=self.scale,
                                    unconditional_conditioning=self.uncond, x_T=self.x_T, verbose=False,
                                    progress=False)
        images = self.decode(latents) if self.decode is not None else None
        return latents, images, time.perf_counter() - start, extra


def start_noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def shipped_subject(config, ckpt, prompts, seed):
    from ldm.checkpoint import load_model
    from ldm.data.shapes import prompt_set
    from ldm.generate import Sampling, latent_channels, latent_factor, native_size, text_conditioning

    model = load_model(config, ckpt, device="cpu")
    scale = SHIPPED_DEFAULTS["scale"]
    chosen = prompt_set(max(prompts, 18), seed=0)[:prompts]
    with torch.no_grad():
        cond, uncond = text_conditioning(model, chosen, Sampling(scale=scale))
    height, width = (side // latent_factor(model) for side in native_size(model))

    def decode(latents):
        with torch.no_grad():
            return ((model.decode_first_stage(latents).float() + 1) / 2).clamp(0, 1)

    x_T = start_noise([len(chosen), latent_channels(model), height, width], seed)
    return Subject("shipped", model, cond, uncond, scale, x_T, decode), chosen


class RandomSD2(torch.nn.Module):
    """What the samplers read from a LatentDiffusion (``apply_model``, the schedule buffers,
    ``num_timesteps``, ``parameterization``) around a bare U-Net: no text encoder, no decoder."""

    def __init__(self, unet, betas, parameterization="eps"):
        super().__init__()
        from ldm.models.diffusion.schedule import schedule_buffers
        self.diffusion_model = unet
        for name, value in schedule_buffers(betas).items():
            self.register_buffer(name, value, persistent=False)
        self.num_timesteps = len(betas)
        self.parameterization = parameterization

    def apply_model(self, x_noisy, t, cond):
        return self.diffusion_model(x_noisy, t, context=cond)


def random_sd2(config_path, smoke, seed):
    """The full-size U-Net of ``config_path`` (tiny widths with ``smoke``) with seeded random
    weights, its zero-initialised layers included, as a RandomSD2 with the config's schedule."""
    from omegaconf import OmegaConf

    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    config = OmegaConf.load(config_path).model.params
    params = OmegaConf.to_container(config.unet_config.params)
    params.update(use_checkpoint=False, use_fp16=False)
    if smoke:   # same graph, tiny widths (as bench/unet_step.py --smoke)
        params.update(model_channels=32, num_head_channels=8)
    torch.manual_seed(seed)
    unet = UNetModel(**params).eval()
    # zero_module() layers (every block's last conv, every proj_out, the output conv) make a fresh
    # U-Net predict eps = 0; give them the default random init so eps depends on x, t and context
    for module in unet.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    betas = make_beta_schedule("linear", config.get("timesteps", 1000), linear_start=config.linear_start,
                               linear_end=config.linear_end)
    return RandomSD2(unet, betas, config.get("parameterization", "eps")), params["context_dim"]


def calibrate_output(model, context_dim, seed):
    """Scale the U-Net's output conv so that eps has unit spread at t = 500, as a trained eps-model."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, model.diffusion_model.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 77, context_dim, generator=gen)
    with torch.no_grad():
        spread = model.apply_model(x, torch.tensor([500]), context).std()
        out_conv = model.diffusion_model.out[-1]
        out_conv.weight /= spread
        out_conv.bias /= spread
    return float(spread)


def full_size_subject(smoke, seed, batch=FULL_SIZE_BATCH, side=8):
    model, context_dim = random_sd2(SD2_CONFIG, smoke, seed)
    spread = calibrate_output(model, context_dim, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond = torch.randn(batch, 77, context_dim, generator=gen)
    uncond = torch.randn(batch, 77, context_dim, generator=gen)
    x_T = start_noise([batch, model.diffusion_model.in_channels, side, side], seed)
    return Subject("sd2-random", model, cond, uncond, OFFICIAL_DEFAULTS["scale"], x_T), spread


# ---------------------------------------------------------------------------------------------
# measuring

def rmse(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def psnr(error):
    """PSNR in dB of an RMSE in [0, 1] pixel space (inf for identical images)."""
    return math.inf if error == 0 else -20 * math.log10(error)


def finite_or_none(value):
    """JSON has no NaN or inf: a diverged run's distance is null."""
    return value if value is not None and math.isfinite(value) else None


def is_stochastic(sampler):
    """Whether ``sampler`` draws noise while sampling (a registry entry may run another's function)."""
    info = SAMPLER_BY_NAME[sampler]
    return (info.function or info.name) in STOCHASTIC_SAMPLERS


def row(run, latents, images, seconds, reference):
    ref_latents, ref_images = reference
    image_rmse = rmse(images, ref_images) if images is not None else None
    return {"sampler": run.sampler, "label": SAMPLER_BY_NAME[run.sampler].label,
            "schedule": run.schedule, "schedule_label": SCHEDULE_LABELS.get(run.schedule, "-"),
            "steps": run.steps, "stochastic": is_stochastic(run.sampler),
            "image_rmse": finite_or_none(image_rmse),
            "psnr_db": finite_or_none(psnr(image_rmse)) if image_rmse is not None else None,
            "latent_rmse": finite_or_none(rmse(latents, ref_latents)),
            "seconds": seconds, "images_per_s": latents.shape[0] / seconds}


def reference_floor(subject, latents, images, denoised):
    """How far the reference is from its own final x0 estimate. The official DDIM returns x at its
    last step's alpha_bar_prev = alphas_cumprod[0], not x0: noise of sigma_end is left in, which the
    sigma samplers (ending at sigma = 0) remove, so even a converged one stays this far away."""
    ab0 = float(subject.model.alphas_cumprod[0])
    floor = {"end_sigma": math.sqrt((1 - ab0) / ab0), "floor_latent_rmse": rmse(latents, denoised)}
    if images is not None:
        floor["floor_image_rmse"] = rmse(images, subject.decode(denoised))
        floor["floor_psnr_db"] = finite_or_none(psnr(floor["floor_image_rmse"]))
    return floor


def measure(subject, runs, reference_steps, seed, log):
    """The reference, then every run against it."""
    with torch.no_grad():   # warm-up: the first model call pays one-off allocation costs
        subject.model.apply_model(subject.x_T, torch.full((subject.x_T.shape[0],), 500), subject.cond)
    ref_latents, ref_images, ref_seconds, intermediates = subject.sample(Run("ddim", None, reference_steps), seed)
    reference = {"sampler": "ddim", "steps": reference_steps, "seconds": ref_seconds,
                 "latent_rms": float(ref_latents.float().pow(2).mean().sqrt()),
                 **reference_floor(subject, ref_latents, ref_images, intermediates["pred_x0"][-1])}
    log(f"{subject.name}: reference DDIM {reference_steps} steps in {ref_seconds:.1f} s, floor {reference}")
    rows = []
    for i, run_ in enumerate(runs):
        latents, images, seconds, _ = subject.sample(run_, seed)
        rows.append(row(run_, latents, images, seconds, (ref_latents, ref_images)))
        log(f"{subject.name} [{i + 1}/{len(runs)}] {rows[-1]['label']} {rows[-1]['schedule_label']} "
            f"{run_.steps}: latent RMSE {rows[-1]['latent_rmse']}, {seconds:.2f} s")
    return {"reference": reference, "rows": rows}


def not_falling(rows, subject, floor, tolerance=1.05):
    """Deterministic (sampler, schedule) pairs whose latent RMSE grows by more than ``tolerance``
    from fewer to more steps to above twice the reference's ``floor`` (below it the distance is the
    reference's own leftover noise): a converging sampler should get closer to the reference."""
    notes, by_pair = [], {}
    for r in rows:
        if not r["stochastic"]:
            by_pair.setdefault((r["label"], r["schedule_label"]), []).append((r["steps"], r["latent_rmse"]))
    for (label, schedule), series in by_pair.items():
        series.sort()
        values = [v for _, v in series]
        if None in values or any(later > max(earlier * tolerance, 2 * floor) for earlier, later in pairwise(values)):
            shown = ", ".join(f"{n} steps {'diverged' if v is None else f'{v:.4g}'}" for n, v in series)
            notes.append(f"{subject}: {label} on {schedule} does not get closer with steps (latent RMSE {shown})")
    return notes


# ---------------------------------------------------------------------------------------------
# reporting

def _cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def markdown_table(rows, images):
    """The per-run table (image columns only when the subject has a decoder)."""
    head = ["sampler", "schedule", "steps", *(["image RMSE", "PSNR dB"] if images else []), "latent RMSE", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"] + (" *" if r["stochastic"] else ""), r["schedule_label"], str(r["steps"])]
        if images:
            cells += [_cell(r["image_rmse"], ".4f"), _cell(r["psnr_db"], ".1f")]
        cells += [_cell(r["latent_rmse"], ".4f"), f"{r['images_per_s']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(rows, images):
    """One line per (sampler, schedule): the distance at each step count (PSNR in dB when the
    subject has images, else latent RMSE) and images/s at the middle step count (or, for a pair
    that did not run it, at its own first, in brackets)."""
    steps = sorted({r["steps"] for r in rows})
    middle = steps[len(steps) // 2]
    by_pair = {}
    for r in rows:
        by_pair.setdefault((r["label"] + (" *" if r["stochastic"] else ""), r["schedule_label"]), {})[r["steps"]] = r
    what, key, fmt = ("PSNR dB", "psnr_db", ".1f") if images else ("latent RMSE", "latent_rmse", ".3f")
    head = ["sampler", "schedule", *(f"{what} {n}" for n in steps), f"images/s {middle}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, schedule), runs in by_pair.items():
        cells = [label, schedule, *(_cell(runs[n][key], fmt) if n in runs else "" for n in steps)]
        first = min(runs)
        cells.append(f"{runs[middle]['images_per_s']:.3g}" if middle in runs
                     else f"({runs[first]['images_per_s']:.3g} at {first})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(report):
    machine = report["machine"]
    print(f"CPU: {machine['cpu']} ({machine['cpu_capability']}), torch {machine['torch']}, "
          f"{machine['threads']} threads; reference: {report['reference']}; * = stochastic sampler")
    for name, result in report["subjects"].items():
        images = name == "shipped"
        ref = result["reference"]
        floor = f"latent RMSE {ref['floor_latent_rmse']:.4f}"
        if "floor_image_rmse" in ref:
            floor += f", image RMSE {ref['floor_image_rmse']:.4f}, PSNR {_cell(ref['floor_psnr_db'], '.1f')} dB"
        print(f"\n{name}: {result.get('runs') or 'subset ' + result.get('subset', '')}, scale {result['scale']:g}, "
              f"latents {result['latent_shape']}, reference latent RMS {ref['latent_rms']:.3f}; the reference ends "
              f"at sigma {ref['end_sigma']:.4f}, {floor} from its own x0 (the floor for samplers ending at 0)\n")
        print(markdown_table(result["rows"], images))
        print()
        print(summary_table(result["rows"], images))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\nwall time {report['wall_seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------
# command line

def _choices(texts, resolve, everything):
    if not texts:
        return list(everything)
    chosen = [resolve(t) for t in texts]
    return _unique(c[0] if isinstance(c, tuple) else c for c in chosen)


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["shipped", "sd2"], choices=["shipped", "sd2"],
                   help="shipped: the shipped model; sd2: the random-weight full-size SD 2.x U-Net")
    p.add_argument("--ckpt", default=None, help="checkpoint instead of the shipped model")
    p.add_argument("--config", default=None, help="its config")
    p.add_argument("--samplers", nargs="+", default=None, help="sampler names (default: all)")
    p.add_argument("--schedules", nargs="+", default=None, help="schedule names (default: all)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="default: 10 20 30 (sd2: 10 20)")
    p.add_argument("--reference-steps", type=int, default=None, help="DDIM steps of the reference (default 250)")
    p.add_argument("--prompts", type=int, default=4, help="prompts (one image each) on the shipped model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="shipped model: each sampler on its default schedule and Karras, each schedule with "
                        "Euler and DPM++ 2M (instead of every sampler x schedule)")
    p.add_argument("--full-size-set", default="core", choices=["core", "all"],
                   help="sd2 subset: core = DDIM, Euler, DPM++ 2M, UniPC at 10 and 20 steps and DPM++ 2M on each "
                        "schedule at 10; all = every sampler at 10 and 20 and DPM++ 2M on each schedule at 20")
    p.add_argument("--smoke", action="store_true",
                   help="tiny settings to check the script: 2 prompts, 8-step reference, 2 steps, tiny sd2 widths")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--table-from", default=None, metavar="JSON", help="print the tables of a results file and stop")
    add_out_arguments(p, "samplers")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts = min(args.prompts, 2)
        args.steps = args.steps or [2]
        args.reference_steps = args.reference_steps or 8
    args.reference_steps = args.reference_steps or 250
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.prompts < 1 or any(n < 1 for n in args.steps or [1]) or args.reference_steps < 1:
        raise UserError("--prompts, --steps and --reference-steps must be at least 1")
    args.samplers = _choices(args.samplers, resolve_sampler, SAMPLERS)
    args.schedules = _choices(args.schedules, resolve_schedule, SCHEDULES)
    if "automatic" in args.schedules:
        raise UserError("--schedules takes schedule names, not Automatic")
    return args


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.table_from is not None:
        try:
            print_report(json.loads(Path(args.table_from).read_text()))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {args.table_from}: {err}") from None
        return 0
    out = checked_results_path(args.out, args.force, "samplers")   # refused before minutes of work
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    report = {"command": shlex.join(["python", "bench/samplers.py", *argv]),
              "machine": machine_record(), "seed": args.seed,
              "reference": f"DDIM, {args.reference_steps} steps, same x_T", "subjects": {}, "notes": []}
    if "shipped" in args.models:
        from ldm.checkpoint import resolve_paths
        config, ckpt = resolve_paths(args.config, args.ckpt)
        subject, prompts = shipped_subject(config, ckpt, args.prompts, args.seed)
        steps = args.steps or [10, 20, 30]
        pairs = shipped_pairs(args.quick, args.samplers, args.schedules)
        runs = [Run(s, sch, n) for s, sch in pairs for n in steps]
        result = measure(subject, runs, args.reference_steps, args.seed, log)
        result.update(config=shown_path(config), ckpt=shown_path(ckpt), prompts=prompts, scale=subject.scale,
                      latent_shape=list(subject.x_T.shape),
                      runs="every sampler on its default schedule and Karras, every schedule with Euler and DPM++ 2M"
                      if args.quick else "every sampler on every schedule")
        report["subjects"]["shipped"] = result
        report["notes"] += not_falling(result["rows"], "shipped", result["reference"]["floor_latent_rmse"])
    if "sd2" in args.models:
        subject, spread = full_size_subject(args.smoke, args.seed)
        runs = full_size_runs(args.full_size_set, args.samplers, args.schedules, args.steps or [10, 20])
        result = measure(subject, runs, args.reference_steps, args.seed, log)
        result.update(config=str(SD2_CONFIG.relative_to(REPO)), smoke_widths=args.smoke, scale=subject.scale,
                      latent_shape=list(subject.x_T.shape), context_shape=list(subject.cond.shape),
                      raw_output_std=spread, subset=args.full_size_set)
        report["subjects"]["sd2-random"] = result
        report["notes"] += not_falling(result["rows"], "sd2-random", result["reference"]["floor_latent_rmse"])
    report["wall_seconds"] = time.perf_counter() - started

    print_report(report)
    write_results(out, report)
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
