"""Writing generated images: numbered files that never overwrite, grids, PNG metadata, watermark.

Every PNG carries a ``parameters`` text chunk (prompt, negative prompt, steps, sampler, scale,
seed, size, model hash) in the widely read "key: value, ..." layout, and by default the
invisible "SDV2" watermark the official scripts embed.
"""
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import UserError

log = logging.getLogger(__name__)

# a sample NNNNN.png and what is written beside it (NNNNN-depth.png) share its number
SAMPLE_PATTERN = re.compile(r"^(\d{5})(?:-[\w-]+)?\.png$")
GRID_PATTERN = re.compile(r"^grid-(\d{4})\.png$")
WATERMARK = b"SDV2"
# (label in the text chunk, key in the parameters dict), in the order written
# (labels as the popular web UIs write them, so their readers parse ours)
PARAMETER_FIELDS = (("Steps", "steps"), ("Sampler", "sampler"), ("Schedule type", "schedule"), ("CFG scale", "scale"),
                    ("Seed", "seed"), ("Size", "size"), ("Model hash", "model_hash"), ("Hypernet", "hypernet"),
                    ("Hypernet hash", "hypernet_hash"), ("Hypernet strength", "hypernet_strength"),
                    ("Clip skip", "clip_skip"),
                    ("Eta", "eta"), ("Timestep spacing", "spacing"), ("CFG Rescale phi", "guidance_rescale"),
                    ("Denoising strength", "strength"), ("Noise level", "noise_level"),
                    ("Lora hashes", "lora_hashes"), ("VAE tiling", "vae_tiling"),
                    ("VAE tiling stats", "vae_tiling_stats"),
                    ("DeepCache", "deepcache"), ("DeepCache depth", "deepcache_depth"),
                    ("Token merging ratio", "tome"), ("Int8", "int8"))
# ControlNet units: params["controlnet"] = ["Module: canny, Model: ..., Weight: 1, ...", ...], written as
# "ControlNet 0: \"...\"", "ControlNet 1: ..." (see cldm.infotext)
CONTROLNET_KEY, CONTROLNET_LABEL = "controlnet", "ControlNet"


def tensor_to_images(x):
    """[B, 3, H, W] in [0, 1] -> list of RGB PIL images (truncated to uint8 as the official
    scripts do, so pixel values match theirs)."""
    x = x.detach().float().cpu().clamp(0, 1)
    arrays = (255.0 * x.permute(0, 2, 3, 1).numpy()).astype(np.uint8)   # b c h w -> b h w c
    return [Image.fromarray(a) for a in arrays]


# ---------------------------------------------------------------------------------------------
# numbering

def next_index(directory, pattern=SAMPLE_PATTERN):
    """One past the highest number among files in ``directory`` matching ``pattern``; 0 if none.

    Counting on from the highest (not the number of files) means deleted files leave gaps
    rather than leading to overwrites.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := pattern.match(p.name))]
    return max(numbers, default=-1) + 1


def ensure_folder(path):
    """Create ``path`` (and its parents) or say in one line why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder '{path}' ({err.strerror or err}); "
                        f"choose another output folder") from None
    return path


def _write_new(image, directory, pattern, name_for, pnginfo):
    """Save under the next free number; exclusive creation so a concurrent run cannot clobber."""
    index = next_index(directory, pattern)
    while True:
        path = Path(directory) / name_for(index)
        try:
            with open(path, "xb") as f:
                image.save(f, format="PNG", pnginfo=pnginfo)
            return path
        except FileExistsError:
            index += 1


# ---------------------------------------------------------------------------------------------
# metadata

def format_parameters(params):
    """The ``parameters`` text: prompt, then "Negative prompt: ...", then "Key: value, ..."."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = [f"{label}: {params[key]}" for label, key in PARAMETER_FIELDS
              if params.get(key) is not None]
    # one field per ControlNet unit, quoted, as sd-webui-controlnet writes them
    fields += [f"{CONTROLNET_LABEL} {i}: {json.dumps(unit, ensure_ascii=False)}"
               for i, unit in enumerate(params.get(CONTROLNET_KEY) or ())]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parse_parameters(text):
    """Inverse of :func:`format_parameters`; values come back as strings."""
    lines = text.split("\n")
    labels = {label: key for label, key in PARAMETER_FIELDS}
    params = {"prompt": "", "negative_prompt": ""}
    last = lines.pop() if lines else ""
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")]
    if negative:
        i = negative[-1]
        params["negative_prompt"] = "\n".join(lines[i:])[len("Negative prompt: "):]
        lines = lines[:i]
    params["prompt"] = "\n".join(lines)
    # a value holding ',' or ':' is JSON-quoted, as A1111 writes it (Lora hashes: "a: 1f2e, b: 3c4d")
    units = {}
    for item in re.finditer(r'([A-Za-z0-9 ]+): ("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)', last):
        label, value = item.group(1), item.group(2)
        if label in labels:
            params[labels[label]] = value
        elif re.fullmatch(rf"{CONTROLNET_LABEL} \d+", label) and value.startswith('"'):
            units[int(label.split()[-1])] = json.loads(value)
    if units:
        params[CONTROLNET_KEY] = [units[i] for i in sorted(units)]
    return params


def read_parameters(path):
    with Image.open(path) as image:
        return parse_parameters(image.text.get("parameters", ""))


def _pnginfo(params):
    info = PngInfo()
    info.add_text("parameters", format_parameters(params))
    return info


# ---------------------------------------------------------------------------------------------
# watermark

def make_watermarker(no_watermark=False):
    """The official invisible-watermark encoder, or None when skipped."""
    if no_watermark:
        return None
    from imwatermark import WatermarkEncoder
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK)
    return encoder


def put_watermark(image, encoder):
    """Embed the watermark; images too small for the DWT-DCT scheme are left as they are."""
    if encoder is None:
        return image
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    try:
        marked = encoder.encode(bgr, "dwtDct")
    except (RuntimeError, ValueError) as err:
        # the library refuses images under 256x256 pixels
        log.debug("no watermark on a %dx%d image: %s", image.width, image.height, err)
        return image
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


# ---------------------------------------------------------------------------------------------
# saving

def _per_image(parameters, n):
    if isinstance(parameters, dict) or parameters is None:
        return [parameters or {}] * n
    parameters = list(parameters)
    if len(parameters) != n:
        raise ValueError(f"{n} images but {len(parameters)} parameter sets")
    return parameters


def save_samples(images, outdir, parameters=None, *, no_watermark=False, watermarker=None):
    """Save each image as ``outdir/NNNNN.png``, numbering on from what is there.

    ``parameters``: one dict for all images or one per image. Returns the paths written.
    """
    outdir = ensure_folder(outdir)
    encoder = watermarker if watermarker is not None else make_watermarker(no_watermark)
    paths = []
    for image, params in zip(images, _per_image(parameters, len(images))):
        paths.append(_write_new(put_watermark(image, encoder), outdir, SAMPLE_PATTERN,
                                lambda i: f"{i:05}.png", _pnginfo(params)))
    return paths


def save_companion(image, sample_path, suffix):
    """Save ``image`` beside a sample as ``NNNNN-<suffix>.png``, never over an existing file.

    The sample's number was free for companions too (numbering counts them), so a clash means
    another run wrote there meanwhile: the image then goes under the next free ``-<suffix>-K``.
    """
    sample_path = Path(sample_path)
    stem = f"{sample_path.stem}-{suffix}"
    for k in range(1000):
        path = sample_path.with_name(f"{stem}.png" if k == 0 else f"{stem}-{k}.png")
        try:
            with open(path, "xb") as f:
                image.save(f, format="PNG")
            return path
        except FileExistsError:
            continue
    raise UserError(f"too many files named {stem}-*.png in {sample_path.parent}; clean the folder up")


def make_grid(images, n_rows):
    """Tile images ``n_rows`` per row (official ``--n_rows`` meaning) with a 2-pixel black border."""
    if not images:
        raise ValueError("no images to put in a grid")
    pad = 2
    w, h = images[0].size
    columns = max(1, min(n_rows, len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(image, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_grid(images, outdir, n_rows, parameters=None, *, no_watermark=False, watermarker=None):
    """Save a grid of ``images`` as ``outdir/grid-NNNN.png``; returns its path."""
    outdir = ensure_folder(outdir)
    encoder = watermarker if watermarker is not None else make_watermarker(no_watermark)
    grid = put_watermark(make_grid(images, n_rows), encoder)
    return _write_new(grid, outdir, GRID_PATTERN, lambda i: f"grid-{i:04}.png",
                      _pnginfo(parameters or {}))


def load_image(path):
    """Open an image file as RGB, or raise UserError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image '{path}' does not exist; pass the path to a PNG or JPEG file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"image '{path}' cannot be read ({err}); pass a PNG or JPEG file") \
            from None


def images_to_tensor(images):
    """List of same-size PIL images -> [B, 3, H, W] float tensor in [-1, 1]."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) * 2.0 - 1.0   # b h w c -> b c h w
