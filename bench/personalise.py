"""Personalisation on the shipped model: train each method through main.py, then measure what it learned.

For each method the training (every command, timed) teaches the model something it cannot draw, and
``ldm.data.shapes_concepts`` reads the samples back:

- textual inversion: a new word "zwx" for one object (a large orange triangle: colour, shape and size in
  one word); share of "a zwx ..." samples that show it where and on what the prompt says, with and
  without the embedding;
- LoRA and hypernetwork: the concept of the run's config, a new shape "star" (large five-pointed stars,
  ordinary captions with "star" for the shape: share of "a ... star ..." samples that read as a star, and
  with the colour asked for) or a style applied to ordinary prompts: shapes drawn as outlines, as a 2x2
  pattern of four copies (and each copy in the colour and shape asked for), or in pastel tints (and the
  tint of the colour asked for); at weight 1, the same with the base model, and whether weight 0 gives
  the base model's images exactly; the base fidelity at weight 1 (what the adapter costs the shapes the
  model already draws);
- DreamBooth: "sks" bound to one instance (a large orange triangle), with prior preservation; share of
  "a sks triangle ..." samples that show it where and on what the prompt says, and the base fidelity
  (``bench/shapes_fidelity.py``'s per-attribute scores) before and after.

    python bench/personalise.py                                  # all four, on the shipped model
    python bench/personalise.py --methods lora --run lora=logs/<run>   # measure a run already trained
    python bench/personalise.py --out bench/results/personalise.json --force   # the committed file
"""
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, checked_results_path, write_results
from shapes_fidelity import model_record, read_single, score

from ldm.cli import ArgumentParser, run
from ldm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITION_PHRASES,
    POSITIONS,
    parse_prompt,
    prompt_set,
)
from ldm.data.shapes_concepts import (
    INSTANCE,
    ShapesConcept,
    concept_colour,
    is_outline,
    is_pastel,
    is_pattern,
    read_shape,
    reads_as_instance,
)
from ldm.errors import UserError

METHODS = ("textual_inversion", "lora", "hypernetwork", "dreambooth")
CONFIGS = {"textual_inversion": "configs/personalise/shapes-textual-inversion.yaml",
           "lora": "configs/personalise/shapes-lora.yaml",
           "hypernetwork": "configs/personalise/shapes-hypernetwork.yaml",
           "dreambooth": "configs/personalise/shapes-dreambooth.yaml"}
TRIGGER = {"textual_inversion": "zwx", "dreambooth": "sks"}
# images per concept for the autoencoder ceiling
CEILING_IMAGES = 64
# seeds for the trigger-word prompts (16 prompts: 64 images)
NAMED_PROMPT_SEEDS = (0, 1, 2, 3)
# the most any base attribute may lose to DreamBooth (percentage points), as the issue asks
PRIOR_TOLERANCE = 5.0


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="base weights (default: the shipped model)")
    p.add_argument("--config", default=None, help="base config (default: the shipped model's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--run", action="append", default=[], metavar="METHOD=RUN_DIR",
                   help="measure this main.py run folder instead of training (repeatable)")
    p.add_argument("--workdir", default="outputs/personalise", help="run folders and DreamBooth images go here")
    p.add_argument("--prompts", type=int, default=144,
                   help="one-shape prompts per measurement (>= 18; with 2 seeds, 288 images: a 5-point drop is 14)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--class-images", type=int, default=100,
                   help="DreamBooth class images, for a config whose prior is a folder of them")
    p.add_argument("--dreambooth-config", default=None,
                   help=f"DreamBooth's config (default {CONFIGS['dreambooth']}; the paper's prior of generated class "
                        "images: configs/personalise/shapes-dreambooth-generated-prior.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: each config's own)")
    p.add_argument("--threads", type=int, default=None)
    add_out_arguments(p, "personalise")
    args = p.parse_args(argv)
    args.runs = {}
    for item in args.run:
        method, _, folder = item.partition("=")
        if method not in METHODS or not folder:
            raise UserError(f"--run takes METHOD=RUN_DIR with METHOD one of {', '.join(METHODS)}, got {item!r}")
        if not Path(folder).is_dir():
            raise UserError(f"--run {item}: no folder {folder}")
        args.runs[method] = Path(folder)
    return args


# ----------------------------------------------------------------------------------------- training
def _timed(command, log):
    """Run ``command`` (a list) from the repo root with its output in ``log``; seconds it took."""
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        done = subprocess.run(command, check=False, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode:
        raise UserError(f"`{shlex.join(command)}` failed (exit {done.returncode}); its output is in {log}")
    return time.perf_counter() - start


def _newest_run(logdir, name):
    runs = sorted(Path(logdir).glob(f"*_{name}"))
    if not runs:
        raise UserError(f"main.py wrote no run folder named *_{name} in {logdir}")
    return runs[-1]


def _prior_is_a_folder(method_config):
    from omegaconf import OmegaConf
    prior = OmegaConf.load(REPO / method_config).data.params.train.params.prior
    return prior.target == "ldm.data.captioned_folder.CaptionedImageFolder"


def train(method, config, ckpt, workdir, class_images, max_steps=None, method_config=None):
    """Train ``method`` with ``method_config`` (default: its committed config) on the base (config, ckpt);
    returns (run folder, [(command, seconds)])."""
    method_config = method_config or CONFIGS[method]
    workdir, logdir, name = Path(workdir), Path(workdir) / "logs", f"bench-{method}"
    workdir.mkdir(parents=True, exist_ok=True)
    log, steps = workdir / f"{method}.log", []
    python = sys.executable
    if method == "dreambooth":
        instance, prior = workdir / "dreambooth" / "instance", workdir / "dreambooth" / "class"
        commands = [[python, "scripts/shapes_concept_images.py", "instance", str(instance), "--n", "8"]]
        overrides = [f"model.params.ckpt_path={ckpt}", f"data.params.train.params.instance.params.folder={instance}"]
        if _prior_is_a_folder(method_config):   # the paper's prior: class images the base model draws first
            commands.append([python, "scripts/generate_class_images.py", "--class-prompt", f"a {INSTANCE['shape']}",
                             "--shapes-phrases", "--n", str(class_images), "--outdir", str(prior),
                             "--ckpt", str(ckpt), "--config", str(config)])
            overrides.append(f"data.params.train.params.prior.params.folder={prior}")
        for command in commands:
            steps.append((shlex.join(command), _timed(command, log)))
        command = [python, "main.py", "--base", str(config), method_config, "-t", "-n", name, "--logdir", str(logdir),
                   *overrides]
    else:
        command = [python, "main.py", "--base", method_config, "-t", "-n", name, "--logdir", str(logdir),
                   f"model.params.base_config={config}", f"model.params.base_ckpt={ckpt}"]
    if max_steps:
        command += ["--max_steps", str(max_steps)]
    steps.append((shlex.join(command), _timed(command, log)))
    folder = _newest_run(logdir, name)
    if method == "dreambooth":
        command = [python, "scripts/export_weights.py", "--force", str(folder / "checkpoints" / "last.ckpt"),
                   str(folder / "dreambooth.safetensors")]
        steps.append((shlex.join(command), _timed(command, log)))
    return folder, steps


# ----------------------------------------------------------------------------------------- measuring
def _sample(model, prompts, seeds):
    from ldm.generate import txt2img
    return {seed: txt2img(model, prompts, seed=seed, n_samples=min(len(prompts), 36), progress=False) for seed in seeds}


def _rate(hits):
    hits = list(hits)
    return {"rate": sum(hits) / len(hits) if hits else None, "n": len(hits)}


def _same_images(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for seed in a for x, y in zip(a[seed], b[seed]))


def base_fidelity(images, prompts):
    held_out = {f"{c} {s}" for c, s in HELD_OUT_PAIRS}
    records = [read_single(p, im, held_out) for seed in images for p, im in zip(prompts, images[seed])]
    return {attr: cell["accuracy"] for attr, cell in score(records).items()}


def _only(folder, pattern, what):
    found = sorted(Path(folder).glob(pattern))
    if len(found) != 1:
        raise UserError(f"expected one {what} ({pattern}) in {folder}, found {len(found)}")
    return found[0]


def measure_textual_inversion(model, folder):
    """Share of "a zwx ..." samples showing the object where and on what the prompt says, with the
    trained embedding and without it (the word then means nothing to the model)."""
    from ldm.modules.encoders.embeddings import use_embeddings
    named = named_prompts(TRIGGER["textual_inversion"])
    prompts = [p for p, _ in named]

    def hits(images):
        return _rate(reads_as_instance(im, wanted) for seed in images for (_, wanted), im in zip(named, images[seed]))

    without = hits(_sample(model, prompts, NAMED_PROMPT_SEEDS))
    use_embeddings(model, folder / "adapters" / "pt")
    try:
        with_embedding = hits(_sample(model, prompts, NAMED_PROMPT_SEEDS))
    finally:
        use_embeddings(model, None)
    return {"prompt_example": prompts[-1], "object": with_embedding, "object_without_embedding": without}


def autoencoder_ceiling(model, n=CEILING_IMAGES):
    """Per concept, the share of its own images that read as the concept after encoding and decoding with
    the model's autoencoder (latent mode, no sampling noise)."""
    readers = {"colour": lambda im, _: concept_colour(im) == "cyan", "outline": lambda im, _: bool(is_outline(im)),
               "object": lambda im, a: reads_as_instance(im, {k: a[k] for k in ("position", "background")}),
               "star": lambda im, a: read_shape(im) == "star" and concept_colour(im) == a["colour"],
               **{concept: STYLES[concept].reads_as_asked for concept in ("pastel", "pattern")}}
    ceiling = {}
    for concept, reads in readers.items():
        data = ShapesConcept(concept, length=n)
        attributes = [data.example(i)[0] for i in range(n)]
        x = torch.stack([torch.from_numpy(data[i]["image"]).permute(2, 0, 1) for i in range(n)])
        with torch.inference_mode():
            decoded = model.decode_first_stage(model.get_first_stage_encoding(model.encode_first_stage(x).mode()))
        images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        ceiling[concept] = _rate(bool(reads(im, a)) for im, a in zip(images, attributes))
    return ceiling


def trained_concept(folder):
    """The ``ShapesConcept`` concept a main.py run folder trained on (from its saved project config)."""
    from omegaconf import OmegaConf
    # main.py writes one per start, named by its time: a resumed run's latest is what it trained last
    configs = sorted((Path(folder) / "configs").glob("*-project.yaml"))
    if not configs:
        raise UserError(f"no project config (*-project.yaml) in {Path(folder) / 'configs'}: not a main.py run folder")
    config = OmegaConf.load(configs[-1])
    # with regularisation images beside them (a PriorPreservationDataset), the concept's images are its instance
    return (OmegaConf.select(config, "data.params.train.params.concept")
            or OmegaConf.select(config, "data.params.train.params.instance.params.concept"))


def star_prompts():
    """``(prompt, colour or None)``: "a large <colour> star <position> on a <background> background" for
    every colour and position (backgrounds in turn), "a <colour> star" and "a star"."""
    named = [("a star", None)] + [(f"a {colour} star", colour) for colour in COLOURS]
    for i, (colour, position) in enumerate((c, p) for c in COLOURS for p in POSITIONS):
        background = BACKGROUNDS[i % len(BACKGROUNDS)]
        named.append((f"a large {colour} star {POSITION_PHRASES[position]} on a {background} background", colour))
    return named


def _star_rates(images, named):
    shapes = [(read_shape(im), concept_colour(im), colour) for seed in images for (_, colour), im in zip(named, images[seed])]
    return {"star": _rate(shape == "star" for shape, _, _ in shapes),
            "star_in_colour": _rate(shape == "star" and seen == colour for shape, seen, colour in shapes if colour)}


class Style(NamedTuple):
    """How the bench reads a style concept: ``reads(image)``, whether the image is in the style, and, for a
    style that keeps what the prompt names, ``reads_as_asked(image, attributes)`` with its ``as_asked`` label."""
    reads: Callable
    as_asked: str | None = None
    reads_as_asked: Callable | None = None


STYLES = {
    "outline": Style(is_outline),
    "pastel": Style(is_pastel, "the tint of the colour asked for", lambda im, a: is_pastel(im, a["colour"])),
    "pattern": Style(is_pattern, "each copy the colour and shape asked for",
                     lambda im, a: is_pattern(im, a["colour"], a["shape"])),
}


def _style_rates(concept, images, prompts, as_asked=True):
    """Share of ``images`` (of the ordinary ``prompts``, which name colour and shape) drawn in the style,
    ``at_1``, and (unless ``as_asked`` is false) where the style keeps what the prompt names,
    ``as_asked_at_1``: in the style and as the prompt says."""
    style = STYLES[concept]
    pairs = [(im, parse_prompt(p)) for seed in images for p, im in zip(prompts, images[seed])]
    rates = {"at_1": _rate(bool(style.reads(im)) for im, _ in pairs)}
    if as_asked and style.reads_as_asked is not None:
        rates["as_asked_at_1"] = _rate(bool(style.reads_as_asked(im, wanted)) for im, wanted in pairs)
    return rates


def measure_style(model, folder, prompts, seeds, base_images, method):
    """For a LoRA or a hypernetwork: its concept (the star or one of STYLES) at weight 1 and in the base model,
    exactness at weight 0, and the base fidelity at weight 1."""
    if method == "lora":
        from ldm.modules.lora.apply import LoraMerger, lora_use
        merger = LoraMerger(model)
        adapter = merger.load(_only(folder / "adapters", "*.safetensors", "LoRA file"))

        def applied(weight):
            return merger.applied([lora_use(adapter, weight)])
    else:
        from ldm.modules.hypernetworks.apply import HypernetworkHooks
        hooks = HypernetworkHooks(model)
        adapter = hooks.load(_only(folder / "adapters", "*.pt", "hypernetwork file"))

        def applied(weight):
            return hooks.applied([(adapter, weight)])
    concept = trained_concept(folder)
    if concept != "star" and concept not in STYLES:
        raise UserError(f"{folder} trained the {concept!r} concept; the style bench reads "
                        f"{', '.join(repr(c) for c in ('star', *STYLES))}")
    result = {"concept": concept}
    if concept == "star":
        named = star_prompts()
        concept_prompts = [p for p, _ in named]
        concept_base = _sample(model, concept_prompts, seeds)
        result["prompt_example"] = concept_prompts[-1]
    with applied(0.0):
        zero = _sample(model, prompts, seeds)
        zero_concept = _sample(model, concept_prompts, seeds) if concept == "star" else None
    with applied(1.0):
        one = _sample(model, prompts, seeds)
        one_concept = _sample(model, concept_prompts, seeds) if concept == "star" else None
    if concept == "star":
        result.update({f"{key}_at_1": cell for key, cell in _star_rates(one_concept, named).items()})
        result.update({f"{key}_in_base": cell for key, cell in _star_rates(concept_base, named).items()})
        exact = _same_images(zero, base_images) and _same_images(zero_concept, concept_base)
    else:
        result.update({f"{concept}_{key}": cell for key, cell in _style_rates(concept, one, prompts).items()})
        result[f"{concept}_in_base"] = _style_rates(concept, base_images, prompts, as_asked=False)["at_1"]
        exact = _same_images(zero, base_images)
    result.update(weight_0_equals_base=exact, fidelity_at_1=base_fidelity(one, prompts))
    return result


def named_prompts(words):
    """``(prompt, wanted attributes)``: "a <words>" with every position phrase and background, and alone."""
    prompts = [(f"a {words}", {})]
    for position in POSITIONS:
        for background in BACKGROUNDS:
            prompts.append((f"a {words} {POSITION_PHRASES[position]} on a {background} background",
                            {"position": position, "background": background}))
    return prompts


def measure_dreambooth(folder, config, prompts, seeds, base_scores):
    from ldm.checkpoint import load_model
    model = load_model(config, folder / "dreambooth.safetensors", device="cpu")
    named = named_prompts(f"{TRIGGER['dreambooth']} {INSTANCE['shape']}")
    images = _sample(model, [p for p, _ in named], NAMED_PROMPT_SEEDS)
    hits = [reads_as_instance(im, wanted) for seed in images for (_, wanted), im in zip(named, images[seed])]
    after = base_fidelity(_sample(model, prompts, seeds), prompts)
    drops = {attr: 100 * (base_scores[attr] - after[attr]) for attr in after if base_scores.get(attr) is not None}
    return {"instance": _rate(hits), "fidelity_after": after, "largest_drop_points": max(drops.values()),
            "within_tolerance": max(drops.values()) <= PRIOR_TOLERANCE}


# ----------------------------------------------------------------------------------------- report
def _pct(cell):
    value = cell["rate"] if isinstance(cell, dict) else cell
    return "-" if value is None else f"{100 * value:.1f}%"


def print_table(report):
    print("\nautoencoder ceiling (own images that read as the concept after encode + decode): " +
          ", ".join(f"{concept} {_pct(cell)}" for concept, cell in report["autoencoder_ceiling"].items()))
    print(f"\n{'method':<18}{'what is measured':<52}{'result':>10}{'train':>10}")
    for method, res in report["methods"].items():
        seconds = sum(s for _, s in res.get("training", [])) if res.get("training") else None
        wall = "-" if seconds is None else f"{seconds / 60:.1f} min"
        if method == "textual_inversion":
            rows = [("'a zwx ...' shows the object", _pct(res["object"])),
                    ("... without the embedding", _pct(res["object_without_embedding"]))]
        elif method in ("lora", "hypernetwork"):
            if res["concept"] == "star":
                rows = [("'a ... star ...' reads as a star at weight 1", _pct(res["star_at_1"])),
                        ("... and in the colour asked for", _pct(res["star_in_colour_at_1"])),
                        ("... in the base model's images", _pct(res["star_in_base"]))]
            else:
                concept = res["concept"]
                rows = [(f"{concept} style at weight 1", _pct(res[f"{concept}_at_1"]))]
                if STYLES[concept].as_asked:
                    rows.append((f"... {STYLES[concept].as_asked}", _pct(res[f"{concept}_as_asked_at_1"])))
                rows.append((f"{concept} style in the base model's images", _pct(res[f"{concept}_in_base"])))
            drop = max(100 * (report["base_fidelity"][a] - v) for a, v in res["fidelity_at_1"].items()
                       if v is not None and report["base_fidelity"].get(a) is not None)
            rows += [("weight 0 gives the base images exactly", str(res["weight_0_equals_base"])),
                     ("largest drop of a base attribute at 1 (points)", f"{drop:.1f}")]
        else:
            rows = [("'a sks triangle ...' shows the instance", _pct(res["instance"])),
                    ("largest drop of a base attribute (points)", f"{res['largest_drop_points']:.1f}")]
        for i, (what, value) in enumerate(rows):
            print(f"{method if i == 0 else '':<18}{what:<52}{value:>10}{wall if i == 0 else '':>10}")


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = checked_results_path(args.out, args.force, "personalise")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.checkpoint import load_model, resolve_paths
    config, ckpt = resolve_paths(args.config, args.ckpt)

    folders, training = {}, {}
    for method in args.methods:
        if method in args.runs:
            folders[method] = args.runs[method]
        else:
            folders[method], training[method] = train(method, config, ckpt, args.workdir, args.class_images,
                                                      args.max_steps, args.dreambooth_config
                                                      if method == "dreambooth" else None)

    model = load_model(config, ckpt, device="cpu")
    prompts = prompt_set(args.prompts, seed=0)
    base_images = _sample(model, prompts, args.seeds)
    base_scores = base_fidelity(base_images, prompts)
    report = {"command": shlex.join(["python", "bench/personalise.py", *argv]), "model": model_record(config, ckpt),
              "settings": {"prompts": len(prompts), "seeds": args.seeds, "threads": torch.get_num_threads()},
              "base_fidelity": base_scores, "autoencoder_ceiling": autoencoder_ceiling(model), "methods": {}}
    for method in args.methods:
        folder = folders[method]
        if method == "textual_inversion":
            res = measure_textual_inversion(model, folder)
        elif method == "dreambooth":
            res = measure_dreambooth(folder, config, prompts, args.seeds, base_scores)
        else:
            res = measure_style(model, folder, prompts, args.seeds, base_images, method)
        res["run"] = str(folder)
        if method in training:
            res["training"] = training[method]
        report["methods"][method] = res
    print_table(report)
    write_results(out, report)
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
