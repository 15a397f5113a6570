"""How faithfully does a model draw what the prompt says? Measured on the shapes vocabulary.

Generates one image per (prompt, seed) for a fixed prompt set that covers every (colour, shape)
pair, the held-out ones included, reads each image back with ``ldm.data.shapes.describe`` and
reports, per attribute, the fraction of images that show what the prompt named. Two-shape prompts
("a red circle on the left and a blue square on the right") are read back with ``describe_pair``:
a scene counts when both shapes have the right colour and shape on the right side (a colour on the
wrong shape is wrong). Prints tables and writes JSON that names the weights by their sha256 and the
command that made it.

    python bench/shapes_fidelity.py                       # the shipped model, the scripts' defaults
    python bench/shapes_fidelity.py --ckpt X --config Y --steps 50 --scale 3 --sampler "DPM++ 2M"
    python bench/shapes_fidelity.py --out bench/results/shapes_fidelity.json --force   # the committed file
"""
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, checked_results_path, shown_path, write_results  # noqa: E402
from ldm.cli import ArgumentParser, run  # noqa: E402
from ldm.data.shapes import (ALL_PAIRS, ATTRIBUTES, HELD_OUT_PAIRS, describe, describe_pair,  # noqa: E402
                             pair_prompt_set, parse_pair_prompt, parse_prompt, prompt_set)
from ldm.errors import UserError  # noqa: E402


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--config", default=None, help="config (default: the shipped model's)")
    p.add_argument("--prompts", type=int, default=216, help="size of the one-shape prompt set (>= 18)")
    p.add_argument("--pair-prompts", type=int, default=72, help="two-shape prompts (0: none)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one image per prompt per seed")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the scripts' default)")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the scripts' default)")
    p.add_argument("--sampler", default=None, help="sampler by name (default: the scripts' default)")
    p.add_argument("--schedule", default=None, help="sigma schedule (default: the sampler's own)")
    p.add_argument("--spacing", default=None, choices=["leading", "trailing", "linspace"],
                   help="DDIM/PLMS timesteps (default: the scripts' default)")
    p.add_argument("--batch", type=int, default=36)
    p.add_argument("--threads", type=int, default=None)
    add_out_arguments(p, "shapes_fidelity")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.pair_prompts < 0:
        raise UserError(f"--pair-prompts must be 0 or more, got {args.pair_prompts}")
    return args


def accuracy_table(records, names):
    """{name: {"accuracy", "n"}}: the share of ``records`` right on each of ``names``, over the records
    that score it (``record["correct"]`` has the name); accuracy None when none does."""
    table = {}
    for name in names:
        hits = [r["correct"][name] for r in records if name in r["correct"]]
        table[name] = {"accuracy": sum(hits) / len(hits) if hits else None, "n": len(hits)}
    return table


def score(records):
    """Accuracy per attribute (over the images whose prompt names it) and the pair accuracy."""
    return accuracy_table(records, (*ATTRIBUTES, "colour+shape"))


SCENE_SCORES = ("both shapes", "left shape", "right shape", "background")


def score_scenes(records):
    """Two-shape accuracy: both shapes right, each side alone, and the background where named."""
    return accuracy_table(records, SCENE_SCORES)


def model_record(config, ckpt):
    """Where the model's files are and their full sha256, which names the weights wherever they are."""
    from ldm.checkpoint import file_hash
    return {"config": shown_path(config), "config_sha256": file_hash(config, length=64),
            "ckpt": shown_path(ckpt), "ckpt_sha256": file_hash(ckpt, length=64)}


def _percent(acc):
    return "-" if acc is None else f"{100 * acc:.1f}%"


def print_table(result):
    settings = result["settings"]
    print(f"{settings['images']} images, {settings['sampler']} {settings['steps']} steps, scale "
          f"{settings['scale']:g}, {result['seconds_per_image']:.3f} s/image on {settings['threads']} threads\n")
    print(f"{'attribute':<14}{'seen pairs':>12}{'held-out':>12}{'overall':>12}")
    for attr in (*ATTRIBUTES, "colour+shape"):
        cells = [_percent(result[part][attr]["accuracy"]) for part in ("seen_pairs", "held_out_pairs", "overall")]
        print(f"{attr:<14}{cells[0]:>12}{cells[1]:>12}{cells[2]:>12}")
    if "scenes" in result:
        print(f"\n{'two shapes':<14}{'seen pairs':>12}{'a held-out':>12}{'overall':>12}")
        for name in SCENE_SCORES:
            cells = [_percent(result["scenes"][part][name]["accuracy"])
                     for part in ("seen_pairs", "with_held_out", "overall")]
            print(f"{name:<14}{cells[0]:>12}{cells[1]:>12}{cells[2]:>12}")


def read_single(prompt, image, held_out):
    wanted, seen = parse_prompt(prompt), describe(image)
    correct = {a: seen.get(a) == v for a, v in wanted.items()}
    correct["colour+shape"] = correct["colour"] and correct["shape"]
    return {"prompt": prompt, "held_out": f"{wanted['colour']} {wanted['shape']}" in held_out, "seen": seen,
            "correct": correct}


def read_scene(prompt, image, held_out):
    wanted, seen = parse_pair_prompt(prompt), describe_pair(image)
    correct = {}
    for obj in wanted["objects"]:
        correct[f"{obj['position']} shape"] = seen[obj["position"]] == {"colour": obj["colour"],
                                                                        "shape": obj["shape"]}
    correct["both shapes"] = correct["left shape"] and correct["right shape"]
    if wanted["background"] is not None:
        correct["background"] = seen["background"] == wanted["background"]
    return {"prompt": prompt, "held_out": any(f"{o['colour']} {o['shape']}" in held_out for o in wanted["objects"]),
            "seen": seen, "correct": correct}


def sampling_settings(args, ckpt, config):
    """The sampler, schedule, spacing, steps and scale of the run: the scripts' defaults for this model
    unless given."""
    from ldm.cli import OFFICIAL_DEFAULTS, SHIPPED_DEFAULTS, uses_shipped_model
    from ldm.models.diffusion.samplers import resolve_sampler, resolve_schedule
    defaults = SHIPPED_DEFAULTS if uses_shipped_model(ckpt, config) else OFFICIAL_DEFAULTS
    sampler, combined = resolve_sampler(args.sampler or defaults.get("sampler", "ddim"))
    schedule = resolve_schedule(args.schedule) if args.schedule else combined
    settings = {"sampler": sampler, "schedule": None if schedule == "automatic" else schedule,
                "timestep_spacing": args.spacing,
                "steps": args.steps or defaults["steps"],
                "scale": args.scale if args.scale is not None else defaults["scale"]}
    if sampler not in ("ddim", "plms"):
        settings["timestep_spacing"] = None
    return settings


def measure(model, settings, singles, scenes, seeds, batch):
    """Sample every prompt once per seed with ``settings`` and score what ``describe`` reads back."""
    from ldm.generate import txt2img
    held_out = {f"{c} {s}" for c, s in HELD_OUT_PAIRS}
    records, scene_records, seconds = [], [], 0.0
    for seed in seeds:
        start = time.perf_counter()
        images = txt2img(model, singles + scenes, seed=seed, n_samples=batch, progress=False,
                         **{k: v for k, v in settings.items() if v is not None})
        seconds += time.perf_counter() - start
        for prompt, image in zip(singles, images):
            records.append({**read_single(prompt, image, held_out), "seed": seed})
        for prompt, image in zip(scenes, images[len(singles):]):
            scene_records.append({**read_scene(prompt, image, held_out), "seed": seed})

    run_settings = {**settings, "seeds": list(seeds), "prompts": len(singles), "pair_prompts": len(scenes),
                    "images": len(records) + len(scene_records), "batch": batch,
                    "threads": torch.get_num_threads()}
    result = {
        "settings": run_settings,
        "seconds_per_image": seconds / run_settings["images"],
        "seen_pairs": score([r for r in records if not r["held_out"]]),
        "held_out_pairs": score([r for r in records if r["held_out"]]),
        "overall": score(records),
        "failures": [r for r in records if not all(r["correct"].values())][:50],
    }
    if scene_records:
        result["scenes"] = {"seen_pairs": score_scenes([r for r in scene_records if not r["held_out"]]),
                            "with_held_out": score_scenes([r for r in scene_records if r["held_out"]]),
                            "overall": score_scenes(scene_records)}
        result["scene_failures"] = [r for r in scene_records if not all(r["correct"].values())][:50]
    return result


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = checked_results_path(args.out, args.force, "shapes_fidelity")   # refused before minutes of work
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.checkpoint import load_model, resolve_paths

    settings = sampling_settings(args, args.ckpt, args.config)
    config, ckpt = resolve_paths(args.config, args.ckpt)
    model = load_model(config, ckpt, device="cpu")
    singles = prompt_set(args.prompts, seed=0)
    scenes = pair_prompt_set(ALL_PAIRS, args.pair_prompts) if args.pair_prompts else []

    result = {"command": shlex.join(["python", "bench/shapes_fidelity.py", *argv]),
              "model": model_record(config, ckpt),
              **measure(model, settings, singles, scenes, args.seeds, args.batch)}
    print_table(result)
    print()
    write_results(out, result)
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
