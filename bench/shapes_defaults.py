"""Which sampler and how many steps should the scripts use for the shipped model? Fidelity per
(sampler, steps), measured as ``bench/shapes_fidelity.py`` measures it, and the pick: the fewest
steps whose fidelity is within ``--tolerance`` points of the best run's.

Fidelity of a run is the mean of six accuracies over its images: colour+shape, size, position and
background of the one-shape prompts, and both shapes right (colour, shape, side) on the two-shape
prompts; the table also shows the worst single attribute and the time per image.

    python bench/shapes_defaults.py --out bench/results/shapes_defaults.json --force   # the committed file
    python bench/shapes_defaults.py --samplers DDIM "DPM++ 2M" --steps 10 20
"""
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import add_out_arguments, checked_results_path, write_results  # noqa: E402
from shapes_fidelity import measure, model_record, sampling_settings  # noqa: E402
from ldm.cli import ArgumentParser, run  # noqa: E402
from ldm.data.shapes import ALL_PAIRS, pair_prompt_set, prompt_set  # noqa: E402
from ldm.errors import UserError  # noqa: E402

SAMPLERS = ["DDIM", "PLMS", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"]
HEADLINE = ("colour+shape", "size", "position", "background")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--config", default=None, help="config (default: the shipped model's)")
    p.add_argument("--samplers", nargs="+", default=SAMPLERS, help="sampler names")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 30])
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the scripts' default)")
    p.add_argument("--prompts", type=int, default=108, help="one-shape prompts per run")
    p.add_argument("--pair-prompts", type=int, default=36, help="two-shape prompts per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tolerance", type=float, default=1.0, help="points below the best that still count")
    p.add_argument("--batch", type=int, default=36)
    p.add_argument("--threads", type=int, default=None)
    add_out_arguments(p, "shapes_defaults")
    args = p.parse_args(argv)
    if min(args.steps) < 1:
        raise UserError(f"--steps must be at least 1, got {min(args.steps)}")
    if args.pair_prompts < 1:
        raise UserError("--pair-prompts must be at least 1: two-shape scenes are part of the score")
    return args


def fidelity(result):
    """The run's headline: mean accuracy (in points) over the one-shape attributes and the two-shape scenes."""
    parts = [result["overall"][a]["accuracy"] for a in HEADLINE]
    parts.append(result["scenes"]["overall"]["both shapes"]["accuracy"])
    return 100 * sum(parts) / len(parts)


def worst(result):
    """The lowest accuracy (points) of any attribute on seen or held-out pairs, or of the scenes."""
    cells = [result[part][a]["accuracy"] for part in ("seen_pairs", "held_out_pairs") for a in HEADLINE]
    cells.append(result["scenes"]["overall"]["both shapes"]["accuracy"])
    return 100 * min(c for c in cells if c is not None)


def pick(rows, tolerance):
    """The row with the fewest steps (then the higher fidelity) within ``tolerance`` of the best."""
    best = max(r["fidelity"] for r in rows)
    good = [r for r in rows if r["fidelity"] >= best - tolerance]
    return min(good, key=lambda r: (r["steps"], -r["fidelity"]))


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = checked_results_path(args.out, args.force, "shapes_defaults")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.checkpoint import load_model, resolve_paths

    config, ckpt = resolve_paths(args.config, args.ckpt)
    model = load_model(config, ckpt, device="cpu")
    singles = prompt_set(args.prompts, seed=0)
    scenes = pair_prompt_set(ALL_PAIRS, args.pair_prompts)
    rows = []
    print(f"{'sampler':<18}{'steps':>6}{'fidelity':>10}{'worst':>8}{'s/image':>9}")
    for name in args.samplers:
        for steps in sorted(args.steps):
            wanted = SimpleNamespace(sampler=name, schedule=None, spacing=None, steps=steps, scale=args.scale)
            settings = sampling_settings(wanted, args.ckpt, args.config)
            result = measure(model, settings, singles, scenes, args.seeds, args.batch)
            row = {"sampler": name, "steps": steps, "fidelity": fidelity(result), "worst": worst(result),
                   "seconds_per_image": result["seconds_per_image"], "settings": result["settings"],
                   "seen_pairs": result["seen_pairs"], "held_out_pairs": result["held_out_pairs"],
                   "scenes": result["scenes"]}
            rows.append(row)
            print(f"{name:<18}{steps:>6}{row['fidelity']:>9.1f}%{row['worst']:>7.1f}%"
                  f"{row['seconds_per_image']:>9.3f}", flush=True)
    chosen = pick(rows, args.tolerance)
    print(f"\npick: {chosen['sampler']}, {chosen['steps']} steps (fidelity {chosen['fidelity']:.1f}%, best "
          f"{max(r['fidelity'] for r in rows):.1f}%, tolerance {args.tolerance:g} points)\n")
    write_results(out, {"command": shlex.join(["python", "bench/shapes_defaults.py", *argv]),
                        "model": model_record(config, ckpt), "tolerance": args.tolerance,
                        "pick": {"sampler": chosen["sampler"], "steps": chosen["steps"]}, "runs": rows})
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
