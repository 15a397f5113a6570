"""Does the shipped shapes ControlNet put the shape where its hint says, at no cost to the prompt?

Hints are region masks (``ldm.data.shapes_control``): the bounding box of a shape at one of the five
named positions (with the dataset's jitter), large or small, and, as a second set, boxes placed
anywhere. Every hint is sampled with the 18 (colour, shape) prompts, held-out pairs included, which
name colour, shape, size and background but never the position. ``describe`` reads each image back:

- inside: at least ``INSIDE`` of the drawn pixels lie in the hinted box (one pixel of slack for the
  antialiased edge);
- position: the position word of the shape's centroid is the hint's;
- colour, shape, colour+shape: against the prompt, compared with the base model given the same
  prompts with the position written in words instead (same seeds);
- strength 0: the controlled model at control strength 0 draws exactly the base model's images.

    python bench/controlnet.py                                   # the shipped ControlNet
    python bench/controlnet.py --control logs/<run>/control.safetensors
    python bench/controlnet.py --out bench/results/controlnet.json --force   # the committed file
"""
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, checked_results_path, shown_path, write_results
from shapes_fidelity import accuracy_table

from ldm.cli import ArgumentParser, run
from ldm.data.shapes import (
    ALL_PAIRS,
    BACKGROUNDS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SIZES,
    caption_for,
    describe,
    shape_geometry,
)
from ldm.data.shapes_control import free_geometry, region_box, region_hint, region_mask
from ldm.data.shapes_describe import drawn_pixels
from ldm.errors import UserError

INSIDE = 0.9
EDGE = 1.0 / 64      # the box grown by one pixel of describe's 64: antialiased edges
SCORES = ("inside", "position", "colour", "shape", "colour+shape")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--control", default=None, help="ControlNet file (default: the shipped one)")
    p.add_argument("--config", default=None, help="its config (default: the .yaml beside it)")
    p.add_argument("--jitters", type=int, default=2, help="hints per (position, size): 2 -> 20 named hints")
    p.add_argument("--free-hints", type=int, default=10, help="hints placed anywhere (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    add_out_arguments(p, "controlnet")
    args = p.parse_args(argv)
    if args.jitters < 1 or args.free_hints < 0:
        raise UserError("--jitters must be at least 1 and --free-hints 0 or more")
    return args


def named_hints(jitters, rng):
    """(box, position, size) for every named position and size, ``jitters`` draws each."""
    hints = []
    for position in POSITIONS:
        for size in SIZES:
            for _ in range(jitters):
                # a square's box: any shape of this size fits it (a triangle's box is as tall as wide)
                cx, cy, extent = shape_geometry({"shape": "square", "size": size, "position": position}, rng)
                hints.append((region_box("square", cx, cy, extent), position, size))
    return hints


def free_hints(count, rng):
    hints = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        extent = shape_geometry({"shape": "square", "size": size, "position": "center"}, rng)[2]
        cx, cy = free_geometry("square", extent, rng)
        hints.append((region_box("square", cx, cy, extent), None, size))
    return hints


def prompts_for(size, offset, with_position=None):
    """The 18 pair prompts at ``size``, backgrounds cycled from ``offset``; the position in words if given."""
    prompts = []
    for i, (colour, shape) in enumerate(ALL_PAIRS):
        attributes = {"shape": shape, "colour": colour, "size": size,
                      "background": BACKGROUNDS[(i + offset) % len(BACKGROUNDS)]}
        if with_position:
            attributes["position"] = with_position
        prompts.append(caption_for(attributes))
    return prompts


def read(image, box, position, colour, shape):
    seen = describe(image)
    drawn = drawn_pixels(image)
    x0, y0, x1, y1 = box
    inside = region_mask((x0 - EDGE, y0 - EDGE, x1 + EDGE, y1 + EDGE), drawn.shape[0])
    correct = {"inside": bool(drawn.any() and (drawn & inside).sum() >= INSIDE * drawn.sum()),
               "colour": seen["colour"] == colour, "shape": seen["shape"] == shape}
    if position is not None:
        correct["position"] = seen["position"] == position
    correct["colour+shape"] = correct["colour"] and correct["shape"]
    return seen, correct


def rates(records, held_out=None):
    return accuracy_table([r for r in records if held_out is None or r["held_out"] == held_out], SCORES)


def measure(controlled, base, hints, settings, seed):
    """Records for the controlled model (hint, no position words) and the base (position in words)."""
    from cldm.generate import ControlUnit, controlnet_txt2img
    from ldm.generate import txt2img
    held_out = set(HELD_OUT_PAIRS)
    records, base_records, zero_equal, seconds = [], [], [], 0.0
    for i, (box, position, size) in enumerate(hints):
        hint = torch.from_numpy(region_hint(box, 128)).permute(2, 0, 1)
        prompts = prompts_for(size, i)
        run_seed = seed + i
        start = time.perf_counter()
        images = controlnet_txt2img(controlled, prompts, [ControlUnit(hint)], seed=run_seed, n_samples=len(prompts),
                                    progress=False, **settings)
        seconds += time.perf_counter() - start
        if i < 2:    # strength 0 against the base model on the same prompts and seeds
            off = controlnet_txt2img(controlled, prompts, [ControlUnit(hint, weight=0.0)], seed=run_seed,
                                     n_samples=len(prompts), progress=False, **settings)
            plain = txt2img(base, prompts, seed=run_seed, n_samples=len(prompts), progress=False, **settings)
            zero_equal += [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(off, plain)]
        worded = prompts_for(size, i, with_position=position) if position else None
        if worded:
            base_images = txt2img(base, worded, seed=run_seed, n_samples=len(worded), progress=False, **settings)
        for j, ((colour, shape), image) in enumerate(zip(ALL_PAIRS, images)):
            seen, correct = read(image, box, position, colour, shape)
            record = {"prompt": prompts[j], "box": [round(v, 3) for v in box], "position": position,
                      "held_out": (colour, shape) in held_out, "seen": seen, "correct": correct}
            records.append(record)
            if worded:
                seen, correct = read(base_images[j], box, position, colour, shape)
                base_records.append({**record, "prompt": worded[j], "seen": seen, "correct": correct})
    return records, base_records, zero_equal, seconds


def _pct(cell):
    return "-" if cell["accuracy"] is None else f"{100 * cell['accuracy']:.1f}%"


def print_table(result):
    s = result["settings"]
    print(f"{s['images']} controlled images, {s['sampler']} {s['steps']} steps, scale {s['scale']:g}, "
          f"{result['seconds_per_image']:.3f} s/image on {s['threads']} threads\n")
    columns = [("hint, named position", result["named"]), ("  seen pairs", result["named_seen"]),
               ("  held-out pairs", result["named_held_out"]), ("hint, placed anywhere", result["free"]),
               ("base, position in words", result["base"])]
    print(f"{'':<26}" + "".join(f"{name:>14}" for name in SCORES))
    for label, table in columns:
        print(f"{label:<26}" + "".join(f"{_pct(table[name]):>14}" for name in SCORES))
    z = result["strength_0"]
    print(f"\nstrength 0: {z['equal']}/{z['images']} images identical to the base model's")


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = checked_results_path(args.out, args.force, "controlnet")
    if args.threads:
        torch.set_num_threads(args.threads)
    from cldm.loading import DEFAULT_CONTROL, load_controlnet_model
    from ldm.checkpoint import (
        DEFAULT_CKPT,
        REPO_ROOT,
        file_hash,
        load_model,
        resolve_paths,
    )
    from ldm.cli import shipped_sampling

    control = Path(args.control or REPO_ROOT / DEFAULT_CONTROL)
    if not control.is_file():
        raise UserError(f"ControlNet file '{control}' does not exist; train one (configs/controlnet/"
                        f"shapes-controlnet.yaml) and pass it as --control")
    controlled = load_controlnet_model(REPO_ROOT / DEFAULT_CKPT, control, args.config, device="cpu")
    base_config, base_ckpt = resolve_paths(None, None)
    base = load_model(base_config, base_ckpt, device="cpu")
    settings = shipped_sampling()

    rng = np.random.default_rng(args.seed)
    named = named_hints(args.jitters, rng)
    free = free_hints(args.free_hints, rng)
    records, base_records, zero_equal, seconds = measure(controlled, base, named + free, settings, args.seed)
    named_records = [r for r in records if r["position"] is not None]
    free_records = [r for r in records if r["position"] is None]
    result = {
        "command": shlex.join(["python", "bench/controlnet.py", *argv]),
        "control": {"path": shown_path(control), "sha256": file_hash(control, length=64)},
        "base_model": {"path": shown_path(base_ckpt), "sha256": file_hash(base_ckpt, length=64)},
        "settings": {**settings, "images": len(records), "named_hints": len(named), "free_hints": len(free),
                     "threads": torch.get_num_threads(), "inside_fraction": INSIDE},
        "seconds_per_image": seconds / len(records),
        "named": rates(named_records), "named_seen": rates(named_records, held_out=False),
        "named_held_out": rates(named_records, held_out=True), "free": rates(free_records),
        "base": rates(base_records),
        "strength_0": {"images": len(zero_equal), "equal": int(sum(zero_equal))},
        "failures": [r for r in records if not all(r["correct"].values())][:60],
    }
    print_table(result)
    print()
    write_results(out, result)
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
