"""How faithfully does a model draw what the prompt says? Measured on the shapes vocabulary.

Generates one image per (prompt, seed) for a fixed prompt set that covers every (colour, shape)
pair, the held-out ones included, reads each image back with ``ldm.data.shapes.describe`` and
reports, per attribute, the fraction of images that show what the prompt named. Prints a table
and writes JSON that names the weights by their sha256 and the command that made it.

    python bench/shapes_fidelity.py                       # the shipped model, 25-step DDIM
    python bench/shapes_fidelity.py --ckpt X --config Y --steps 50 --scale 3
    python bench/shapes_fidelity.py --out bench/results/shapes_fidelity.json --force   # the committed file
"""
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, results_path, write_results  # noqa: E402
from ldm.cli import ArgumentParser, run  # noqa: E402
from ldm.data.shapes import ATTRIBUTES, HELD_OUT_PAIRS, describe, parse_prompt, prompt_set  # noqa: E402
from ldm.errors import UserError  # noqa: E402


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--config", default=None, help="config (default: the shipped model's)")
    p.add_argument("--prompts", type=int, default=216, help="size of the prompt set (>= 18)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one image per prompt per seed")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the CLI default)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "plms", "dpm"])
    p.add_argument("--batch", type=int, default=36)
    p.add_argument("--threads", type=int, default=None)
    add_out_arguments(p, "shapes_fidelity")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    return args


def score(records):
    """Accuracy per attribute (over the images whose prompt names it) and the pair accuracy."""
    table = {}
    for attr in (*ATTRIBUTES, "colour+shape"):
        hits = [r["correct"][attr] for r in records if attr in r["correct"]]
        table[attr] = {"accuracy": sum(hits) / len(hits) if hits else None, "n": len(hits)}
    return table


def shown_path(path):
    """``path`` relative to the repo when it is inside it (the same on every clone), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def model_record(config, ckpt):
    """Where the model's files are and their full sha256, which names the weights wherever they are."""
    from ldm.checkpoint import file_hash
    return {"config": shown_path(config), "config_sha256": file_hash(config, length=64),
            "ckpt": shown_path(ckpt), "ckpt_sha256": file_hash(ckpt, length=64)}


def print_table(result):
    settings = result["settings"]
    print(f"{settings['images']} images, {settings['sampler']} {settings['steps']} steps, scale "
          f"{settings['scale']:g}, {result['seconds_per_image']:.3f} s/image on {settings['threads']} threads\n")
    print(f"{'attribute':<14}{'seen pairs':>12}{'held-out':>12}{'overall':>12}")
    for attr in (*ATTRIBUTES, "colour+shape"):
        cells = []
        for part in ("seen_pairs", "held_out_pairs", "overall"):
            acc = result[part][attr]["accuracy"]
            cells.append("-" if acc is None else f"{100 * acc:.1f}%")
        print(f"{attr:<14}{cells[0]:>12}{cells[1]:>12}{cells[2]:>12}")


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        out = results_path(args.out, args.force, "shapes_fidelity")   # refused before minutes of work
    except FileExistsError as err:
        raise UserError(str(err)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.checkpoint import load_model, resolve_paths
    from ldm.cli import default_scale
    from ldm.generate import txt2img

    config, ckpt = resolve_paths(args.config, args.ckpt)
    scale = args.scale if args.scale is not None else default_scale(ckpt)
    model = load_model(config, ckpt, device="cpu")
    prompts = prompt_set(args.prompts, seed=0)
    held_out = {f"{c} {s}" for c, s in HELD_OUT_PAIRS}

    records, seconds = [], 0.0
    for seed in args.seeds:
        start = time.perf_counter()
        images = txt2img(model, prompts, sampler=args.sampler, steps=args.steps, scale=scale, seed=seed,
                         n_samples=args.batch, progress=False)
        seconds += time.perf_counter() - start
        for prompt, image in zip(prompts, images):
            wanted, seen = parse_prompt(prompt), describe(image)
            correct = {a: seen.get(a) == v for a, v in wanted.items()}
            correct["colour+shape"] = correct["colour"] and correct["shape"]
            pair = f"{wanted['colour']} {wanted['shape']}"
            records.append({"prompt": prompt, "seed": seed, "held_out": pair in held_out, "seen": seen,
                            "correct": correct})

    settings = {"sampler": args.sampler, "steps": args.steps, "scale": scale, "seeds": args.seeds,
                "prompts": len(prompts), "images": len(records), "batch": args.batch,
                "threads": torch.get_num_threads()}
    result = {
        "command": shlex.join(["python", "bench/shapes_fidelity.py", *argv]),
        "model": model_record(config, ckpt),
        "settings": settings,
        "seconds_per_image": seconds / len(records),
        "seen_pairs": score([r for r in records if not r["held_out"]]),
        "held_out_pairs": score([r for r in records if r["held_out"]]),
        "overall": score(records),
        "failures": [r for r in records if not all(r["correct"].values())][:50],
    }
    print_table(result)
    print()
    write_results(out, result)
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
