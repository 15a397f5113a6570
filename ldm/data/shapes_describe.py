"""Read the shapes vocabulary back from pixels, with no learning: the fidelity metric's eye.

All measurements happen on a 64x64 copy of the image in [0, 1] RGB:

- background: nearest background palette colour to the median of a 2-pixel border ring (shapes
  keep a 5% margin, so the border is background);
- shape pixels: on a 3x3 median-filtered copy, those farther from the border colour than half the
  shape/background contrast; largest 4-connected component only, so specks elsewhere do not count;
- colour: nearest palette colour to the median of the interior shape pixels;
- coverage: per pixel near the shape, its projection onto the background->shape colour line, i.e.
  how much of the pixel the shape covers; area and centroid are sums over it, so antialiasing,
  blur and zero-mean noise do not bias them;
- shape: the ideal circle, square or apex-up triangle (fill ratio of its bounding box pi/4, 1, 1/2)
  of the same centroid and area that best matches the coverage in L1, each also tried blurred;
  this is the bounding-box fill-ratio idea made sub-pixel and blur-tolerant;
- size: the bounding-box side implied by the area and that shape's ideal fill ratio;
- position: centroid offset from the image centre.
"""
import functools
from collections import deque

import numpy as np
from PIL import Image, ImageFilter

from ldm.data.shapes_vocabulary import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    EXTENT_RANGE,
    STAR_INNER_RATIO,
    shape_reach,
    star_radius,
)
from ldm.errors import UserError

SIDE = 64
BORDER = 2
# Pixels farther than this from the border colour seed the contrast estimate; below the closest
# palette contrast (purple on gray, ~0.42) and well above mild noise (sigma 0.05 per channel).
SEED_DISTANCE = 0.2
MIN_SHAPE_PIXELS = 12
IDEAL_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
# Shapes outside the vocabulary that a reader may ask :func:`measure` to fit as well (describe never
# does): area over the squared bounding-box width, as above. A star's is 10 triangles between its centre
# and two neighbouring corners, over its width squared.
EXTRA_FILL = {"star": 5 * STAR_INNER_RATIO * np.sin(np.pi / 5) * star_radius(1.0) ** 2}
_ANY_FILL = {**IDEAL_FILL, **EXTRA_FILL}
# Coverage is estimated this many pixels beyond the hard mask (antialiased and blurred edges).
ROI_MARGIN = 2
TEMPLATE_SUBSAMPLE = 4
# Generated images are often soft: each ideal shape is also tried blurred by these sigmas (pixels),
# so a blurred square matches a blurred square template rather than a sharp circle.
TEMPLATE_BLURS = (0.0, 0.7, 1.4, 2.1)
# Geometric mean of the largest small and the smallest large extent.
LARGE_FROM = float(np.sqrt(EXTENT_RANGE["small"][1] * EXTENT_RANGE["large"][0]))
# Centroid offsets up to this (fraction of the side) on both axes read as "center"; the dataset
# jitters centred shapes by <= 0.03 and places off-centre ones >= 0.14 away.
CENTER_WITHIN = 0.085


def _to_pil(image):
    """Any PIL image or HxWx3 uint8/float array -> 64x64 RGB PIL image."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise UserError(f"describe needs an HxWx3 image, got an array of shape {array.shape}")
        if array.dtype == np.uint8:
            pil = Image.fromarray(array)
        else:
            array = array.astype(np.float32)
            # [-1, 1] (the dataset's and the model's range): every palette colour has a channel
            # near 0, i.e. near -1 there, while noisy [0, 1] images dip only slightly below 0.
            if array.min() < -0.25:
                array = (array + 1) / 2
            elif array.max() > 1.5:  # floats that still hold 0..255
                array = array / 255
            pil = Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))
    if pil.size != (SIDE, SIDE):
        pil = pil.resize((SIDE, SIDE), Image.BILINEAR)
    return pil


def _nearest(rgb, palette):
    names = list(palette)
    colours = np.asarray([palette[n] for n in names], dtype=np.float32) / 255
    return names[int(np.argmin(np.linalg.norm(colours - rgb, axis=1)))]


def _largest_component(mask):
    """The largest 4-connected region of a boolean mask (a 64x64 flood fill is cheap)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best


def _erode(mask):
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _dilate(mask, steps):
    outer = mask.copy()
    for _ in range(steps):
        grown = outer.copy()
        grown[1:, :] |= outer[:-1, :]
        grown[:-1, :] |= outer[1:, :]
        grown[:, 1:] |= outer[:, :-1]
        grown[:, :-1] |= outer[:, 1:]
        outer = grown
    return outer


def _border_colour(rgb):
    """Median colour of the ``BORDER``-pixel ring around ``rgb`` [H, W, 3] (shapes keep off the border)."""
    ring = np.concatenate([rgb[:BORDER].reshape(-1, 3), rgb[-BORDER:].reshape(-1, 3),
                           rgb[:, :BORDER].reshape(-1, 3), rgb[:, -BORDER:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def _colour_and_shape(stats):
    """Nearest palette colour and best-fitting shape of ``measure``'s statistics of a shape."""
    return _nearest(stats["shape_rgb"], COLOUR_RGB), min(stats["misfit"], key=stats["misfit"].get)


def _foreground(rgb, background_rgb):
    """Every pixel that stands out from the background (any number of regions), or None."""
    distance = np.linalg.norm(rgb - background_rgb, axis=-1)
    seed = distance > SEED_DISTANCE
    if seed.sum() < MIN_SHAPE_PIXELS:
        return None
    contrast = float(np.median(distance[seed]))
    return distance > max(contrast / 2, SEED_DISTANCE / 2)


def _shape_mask(rgb, background_rgb):
    foreground = _foreground(rgb, background_rgb)
    if foreground is None:
        return None
    mask = _largest_component(foreground)
    return mask if mask.sum() >= MIN_SHAPE_PIXELS else None


def drawn_pixels(image):
    """[64, 64] bool: the pixels of ``image`` (as :func:`describe` takes it, resized to 64x64) that stand
    out from the background, every region of them, not only the shape's; all False when none do."""
    smooth = np.asarray(_to_pil(image).filter(ImageFilter.MedianFilter(3)), dtype=np.float32) / 255
    foreground = _foreground(smooth, _border_colour(smooth))
    return np.zeros((SIDE, SIDE), dtype=bool) if foreground is None else foreground


def _coverage(shape, cx, cy, area):
    """Fraction of each pixel an ideal shape of this centroid and area covers (pixel units)."""
    left, right, up, down = shape_reach(shape, np.sqrt(area / _ANY_FILL[shape]))
    steps = (np.arange(SIDE * TEMPLATE_SUBSAMPLE) + 0.5) / TEMPLATE_SUBSAMPLE
    dx = steps[None, :] - cx  # (1, W*s)
    dy = steps[:, None] - cy  # (H*s, 1)
    if shape == "circle":
        inside = dx**2 + dy**2 <= left**2
    elif shape == "square":
        inside = (-left <= dx) & (dx <= right) & (-up <= dy) & (dy <= down)
    elif shape == "star":
        # Folded by its symmetry onto one half point: angle 0 at an outer corner (radius `up`), pi/5 at
        # the next inner one; inside when nearer the centre than the edge between them on that ray.
        half_point = np.pi / 5
        angle = np.mod(np.arctan2(dx, -dy), 2 * half_point)
        angle = np.minimum(angle, 2 * half_point - angle)
        outer, inner = up, up * STAR_INNER_RATIO
        edge = outer * inner * np.sin(half_point) / (outer * np.sin(angle) + inner * np.sin(half_point - angle))
        inside = dx**2 + dy**2 <= edge**2
    else:
        # Apex up: the half-width grows linearly from 0 at the apex to `left` at the base.
        depth = dy + up
        inside = (depth >= 0) & (depth <= up + down) & (np.abs(dx) <= depth * left / (up + down))
    sub = TEMPLATE_SUBSAMPLE
    return inside.reshape(SIDE, sub, SIDE, sub).mean(axis=(1, 3))  # (H, W)


@functools.lru_cache(maxsize=None)
def _blur_matrix(sigma):
    """(SIDE, SIDE) matrix B with B @ column = column blurred by a Gaussian (zero outside)."""
    offsets = np.arange(SIDE)[:, None] - np.arange(SIDE)[None, :]
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum(axis=1, keepdims=True).max()


def _gaussian_blur(array, sigma):
    if sigma == 0:
        return array
    blur = _blur_matrix(sigma)
    return blur @ array @ blur.T


def _misfit(coverage, shape, cx, cy, area):
    """L1 distance, relative to area, to the best-fitting blur of the ideal shape."""
    ideal = _coverage(shape, cx, cy, area)
    return min(float(np.abs(coverage - _gaussian_blur(ideal, sigma)).sum()) / area
               for sigma in TEMPLATE_BLURS)


def measure(image, shapes=tuple(IDEAL_FILL)):
    """The raw statistics :func:`describe` classifies (handy for thresholds and debugging).

    Beyond the hard mask, each pixel near the shape gets a coverage estimate: its projection onto
    the background->shape colour line (not clipped, so noise averages out of sums). Area and
    centroid are sums over it, and ``misfit[shape]`` is the L1 distance, relative to the area,
    between it and the ideal shape of the same centroid and area, for each of ``shapes`` (the vocabulary's,
    or also those of :data:`EXTRA_FILL`).
    """
    pil = _to_pil(image)
    rgb = np.asarray(pil, dtype=np.float32) / 255
    # The hard mask comes from a median-filtered copy (noise specks gone, edges kept); coverage,
    # area and centroid use the unfiltered pixels, where noise averages out.
    smooth = np.asarray(pil.filter(ImageFilter.MedianFilter(3)), dtype=np.float32) / 255
    background_rgb = _border_colour(rgb)
    stats = {"background_rgb": background_rgb}
    mask = _shape_mask(smooth, background_rgb)
    if mask is None:
        return stats
    inner = _erode(mask)
    shape_rgb = np.median(rgb[inner] if inner.sum() >= MIN_SHAPE_PIXELS // 2 else rgb[mask], axis=0)
    direction = shape_rgb - background_rgb
    coverage = ((rgb - background_rgb) @ direction) / float(direction @ direction)
    coverage = np.where(_dilate(mask, ROI_MARGIN), coverage, 0.0)
    area = float(coverage.sum())
    if area < MIN_SHAPE_PIXELS:
        return stats
    centres = np.arange(SIDE) + 0.5
    cx = float(coverage.sum(axis=0) @ centres) / area
    cy = float(coverage.sum(axis=1) @ centres) / area
    stats.update(
        shape_rgb=shape_rgb,
        area=area / SIDE**2,
        centroid=(cx / SIDE, cy / SIDE),
        misfit={shape: _misfit(coverage, shape, cx, cy, area) for shape in shapes},
    )
    return stats


def _position(cx, cy):
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) <= CENTER_WITHIN:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def describe(image):
    """Attributes of the one shape in ``image``: dict(colour, shape, background, size, position).

    ``image`` is a PIL image or an HxWx3 array, any size: uint8, or float in [0, 1], [-1, 1]
    (assumed when the minimum is below -0.25) or [0, 255] (maximum above 1.5).
    When no shape stands out from the background, every key but ``background`` is ``None``.
    """
    stats = measure(image)
    result = {"colour": None, "shape": None, "size": None, "position": None,
              "background": _nearest(stats["background_rgb"], BACKGROUND_RGB)}
    if "area" not in stats:
        return result
    colour, shape = _colour_and_shape(stats)
    extent = np.sqrt(stats["area"] / IDEAL_FILL[shape])
    result.update(
        colour=colour,
        shape=shape,
        size="large" if extent >= LARGE_FROM else "small",
        position=_position(*stats["centroid"]),
    )
    return result


def describe_pair(image):
    """What a two-shape scene shows: ``{"background", "left", "right"}``, each side a dict(colour, shape)
    or ``None`` when no shape stands out in that half.

    Each half is read alone by :func:`describe`, with the other half painted in the background colour,
    so a shape drawn across the middle is read as two halves of a shape (and counts as wrong), and a
    colour on the wrong shape is seen as such. A side's shape must also lie in its half: its centroid
    on that side of the middle.
    """
    rgb = np.asarray(_to_pil(image), dtype=np.float32) / 255
    background_rgb = _border_colour(rgb)
    result = {"background": _nearest(background_rgb, BACKGROUND_RGB)}
    middle = SIDE // 2
    for side, blank in (("left", np.s_[:, middle:]), ("right", np.s_[:, :middle])):
        half = rgb.copy()
        half[blank] = background_rgb
        stats = measure(half)
        if "area" not in stats or (stats["centroid"][0] < 0.5) != (side == "left"):
            result[side] = None
            continue
        colour, shape = _colour_and_shape(stats)
        result[side] = {"colour": colour, "shape": shape}
    return result
