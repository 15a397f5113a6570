"""A procedurally generated text-to-image dataset: one solid shape on a plain background.

Every image is drawn on the fly from its index (no files on disk) so a tiny latent diffusion model
can be trained and checked on CPU. The vocabulary and palette are in
:mod:`ldm.data.shapes_vocabulary`; :func:`describe` (from :mod:`ldm.data.shapes_describe`) reads
them back from pixels, which is how generated images are scored.

Geometry is expressed in fractions of the image side, so every ``size`` draws the same picture:

- ``extent``: width of the shape's bounding box (triangles are as tall as they are wide);
- ``(cx, cy)``: the shape's area centroid (for a triangle this is 1/3 of the height above the base),
  because :func:`describe` reads position from the centroid of the shape pixels.

Held-out pairs: ``HELD_OUT_PAIRS`` never occur in the training split. The validation split samples
all 18 (colour, shape) pairs uniformly, held-out ones included, so validation loss and samples show
whether the model composes colours and shapes it never saw together.
"""
import itertools
import re

import numpy as np
import torch

from ldm.data.shapes_describe import describe, describe_pair  # noqa: F401  (public here: reads images back)
from ldm.data.shapes_pairs import (pair_caption, pair_prompt_set, parse_pair_prompt,  # noqa: F401
                                   render_pair, sample_pair)
from ldm.data.shapes_vocabulary import (ATTRIBUTES, BACKGROUNDS, COLOURS, EXTENT_RANGE, POSITIONS, SHAPES, SIZES,
                                        VOCABULARY, draw_shapes, shape_reach, with_article)
from ldm.errors import UserError

# (colour, shape) pairs that the training split never shows.
HELD_OUT_PAIRS = (("purple", "triangle"), ("orange", "square"), ("green", "circle"))
ALL_PAIRS = tuple(itertools.product(COLOURS, SHAPES))
TRAIN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Off-centre positions put the centroid this far from the image centre along their axis...
OFFSET_RANGE = (0.19, 0.23)
# ...and every position jitters this much across it (both axes for "center").
CROSS_JITTER = 0.03
# Shapes stay this far from the image border, so the border shows only background.
MARGIN = 0.05

SPLIT_IDS = {"train": 0, "validation": 1}


def _check_attributes(attributes, keys=ATTRIBUTES):
    for key in keys:
        if key not in attributes:
            raise UserError(f"shapes attributes are missing '{key}' (need {', '.join(keys)})")
    for key, value in attributes.items():
        if key in VOCABULARY and value not in VOCABULARY[key]:
            raise UserError(f"shapes attribute {key}={value!r} is not one of "
                            f"{', '.join(VOCABULARY[key])}")


def _check_size(size):
    if int(size) < 16:
        raise UserError(f"shapes image size must be at least 16 pixels, got {size}")


def shape_geometry(attributes, rng=None):
    """Centroid ``(cx, cy)`` and bounding-box ``extent`` (fractions of the side) for the attributes.

    Without ``rng`` the geometry is the middle of every range; with it, position and extent jitter
    within their category.
    """
    def draw(low, high):
        return (low + high) / 2 if rng is None else float(rng.uniform(low, high))

    extent = draw(*EXTENT_RANGE[attributes["size"]])
    offset = draw(*OFFSET_RANGE)
    jitter_x = draw(-CROSS_JITTER, CROSS_JITTER)
    jitter_y = draw(-CROSS_JITTER, CROSS_JITTER)
    dx, dy = {"left": (-offset, jitter_y), "right": (offset, jitter_y), "top": (jitter_x, -offset),
              "bottom": (jitter_x, offset), "center": (jitter_x, jitter_y)}[attributes["position"]]
    left, right, up, down = shape_reach(attributes["shape"], extent)
    # A large triangle at the top cannot go as high as a square; clamping keeps it inside the
    # margin while still leaving it well off-centre (offset >= 0.14 > the 0.03 centre jitter).
    cx = min(max(0.5 + dx, MARGIN + left), 1 - MARGIN - right)
    cy = min(max(0.5 + dy, MARGIN + up), 1 - MARGIN - down)
    return cx, cy, extent


def render(attributes, size=64, rng=None):
    """Draw one shape image (``PIL.Image``, RGB, ``size`` x ``size``).

    ``attributes`` needs shape, colour, background, size and position. ``rng`` (a
    ``numpy.random.Generator``) jitters position and extent; ``None`` draws the canonical geometry.
    Edges are antialiased by drawing at 4x and box-downsampling.
    """
    _check_attributes(attributes)
    _check_size(size)
    cx, cy, extent = shape_geometry(attributes, rng)
    return draw_shapes(size, attributes["background"],
                       [(attributes["shape"], attributes["colour"], cx, cy, extent)])


def _caption(attributes, include):
    words = [attributes[key] for key in ("size", "colour") if key in include]
    caption = with_article(words + [attributes["shape"]])
    if "position" in include:
        caption += " " + POSITION_PHRASES[attributes["position"]]
    if "background" in include:
        caption += f" on a {attributes['background']} background"
    return caption


def caption_for(attributes, rng_or_full=True):
    """Caption naming the attributes, e.g. "a large red circle on the left on a white background".

    ``rng_or_full=True`` names every attribute present in ``attributes`` (only ``shape`` is
    required, so ``{"shape": "circle", "colour": "red"}`` gives "a red circle"). A
    ``numpy.random.Generator`` instead keeps the full caption 30% of the time and otherwise each
    attribute but the shape with probability 1/2, so short prompts are in the training data.
    """
    _check_attributes(attributes, keys=("shape",))
    optional = [key for key in ("size", "colour", "position", "background") if key in attributes]
    if rng_or_full is True:
        return _caption(attributes, set(optional))
    if not isinstance(rng_or_full, np.random.Generator):
        raise UserError("caption_for needs rng_or_full=True or a numpy.random.Generator")
    return _random_caption(attributes, rng_or_full)


def _random_caption(attributes, rng):
    """:func:`caption_for` with a generator, for any shape word (the concept datasets' "star" too)."""
    optional = [key for key in ("size", "colour", "position", "background") if key in attributes]
    full = rng.random() < 0.3
    keep = rng.random(len(optional)) < 0.5
    return _caption(attributes, {key for key, k in zip(optional, keep) if full or k})


_WORD_TO_ATTRIBUTE = {
    **{w: ("shape", w) for w in SHAPES},
    **{w: ("colour", w) for w in COLOURS},
    **{w: ("background", w) for w in BACKGROUNDS},
    **{w: ("size", w) for w in SIZES},
    **{w: ("position", w) for w in POSITIONS},
    "grey": ("background", "gray"),
    "centre": ("position", "center"),
    "middle": ("position", "center"),
}


def parse_prompt(prompt):
    """Attributes a prompt names, e.g. "a red circle at the top" -> {shape, colour, position}.

    Colour words for shapes and backgrounds are disjoint, so each word maps to one attribute.
    Attributes the prompt does not mention are absent from the result.
    """
    found = {}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word not in _WORD_TO_ATTRIBUTE:
            continue
        key, value = _WORD_TO_ATTRIBUTE[word]
        if found.get(key, value) != value:
            raise UserError(f"prompt {prompt!r} names two {key}s ({found[key]}, {value}); "
                            "shapes prompts describe one shape")
        found[key] = value
    return found


def _cycled(values, n, rng):
    """``n`` values: whole shuffled copies of ``values`` back to back (balanced coverage)."""
    out = []
    while len(out) < n:
        out.extend(rng.permutation(len(values)).tolist())
    return [values[i] for i in out[:n]]


def prompt_set(n=200, seed=0):
    """``n`` benchmark prompts covering every (colour, shape) pair, held-out pairs included.

    Every prompt names colour and shape. The drawn values of every attribute are balanced (each
    value equally often, give or take one); even-numbered prompts name every attribute, the others
    each of size, position and background with probability 1/2. Deterministic in ``seed``; read
    the attributes back with :func:`parse_prompt`.
    """
    if n < len(ALL_PAIRS):
        raise UserError(f"prompt_set needs n >= {len(ALL_PAIRS)} to cover every (colour, shape) pair, "
                        f"got {n}")
    rng = np.random.default_rng([int(seed), 7])
    columns = {
        "pair": _cycled(ALL_PAIRS, n, rng),
        "background": _cycled(BACKGROUNDS, n, rng),
        "size": _cycled(SIZES, n, rng),
        "position": _cycled(POSITIONS, n, rng),
    }
    prompts = []
    for i in range(n):
        colour, shape = columns["pair"][i]
        attributes = {"colour": colour, "shape": shape,
                      **{key: columns[key][i] for key in ("background", "size", "position")}}
        include = {"colour"}
        for key in ("size", "position", "background"):
            if i % 2 == 0 or rng.random() < 0.5:
                include.add(key)
        prompts.append(_caption(attributes, include))
    return prompts


def sample_attributes(rng, split="train"):
    """Uniform attributes for one image; the train split skips ``HELD_OUT_PAIRS``."""
    pairs = TRAIN_PAIRS if split == "train" else ALL_PAIRS
    colour, shape = pairs[rng.integers(len(pairs))]
    return {
        "shape": shape,
        "colour": colour,
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "size": SIZES[rng.integers(len(SIZES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
    }


class ShapesDataset(torch.utils.data.Dataset):
    """Shape images in [-1, 1] (float32, HxWx3) with captions, generated from the index.

    Item ``i`` depends only on ``(seed, split, i)`` — its generator is seeded with exactly that —
    so it is identical in every process and for any number of data-loader workers. Items are dicts
    ``{image_key: image, caption_key: caption, attributes_key: attributes}``; set
    ``attributes_key=None`` to leave the attributes out.

    ``pair_fraction``: the share of two-shape scenes (:mod:`ldm.data.shapes_pairs`), whose
    attributes are a scene dict. Their keys differ from a single shape's, which batching cannot
    mix, so with scenes the default ``attributes_key`` ("auto") leaves attributes out of items;
    :meth:`example` still gives them.
    """

    def __init__(self, split="train", size=64, length=10000, seed=0, image_key="image",
                 caption_key="caption", attributes_key="auto", pair_fraction=0.0):
        if split not in SPLIT_IDS:
            raise UserError(f"shapes split must be one of {', '.join(SPLIT_IDS)}, got {split!r}")
        if int(length) < 1:
            raise UserError(f"shapes dataset length must be positive, got {length}")
        if int(seed) < 0:
            raise UserError(f"shapes dataset seed must be a non-negative integer, got {seed}")
        _check_size(size)
        if not 0.0 <= float(pair_fraction) <= 1.0:
            raise UserError(f"shapes pair_fraction must be from 0 to 1, got {pair_fraction}")
        self.pair_fraction = float(pair_fraction)
        if attributes_key == "auto":
            attributes_key = None if self.pair_fraction else "attributes"
        self.split = split
        self.size = int(size)
        self.length = int(length)
        self.seed = int(seed)
        self.image_key = image_key
        self.caption_key = caption_key
        self.attributes_key = attributes_key

    def __len__(self):
        return self.length

    def _rng(self, index):
        # Seeded by integers only (no str hash, which is salted per process).
        return np.random.default_rng([self.seed, SPLIT_IDS[self.split], int(index)])

    def _draw_attributes(self, rng):
        """(attributes, is a two-shape scene): the generator's first draws."""
        if self.pair_fraction and rng.random() < self.pair_fraction:
            return sample_pair(rng, TRAIN_PAIRS if self.split == "train" else ALL_PAIRS), True
        return sample_attributes(rng, self.split), False

    def attributes(self, index):
        """Attributes of item ``index`` without drawing it: a single shape's, or a scene dict."""
        return self._draw_attributes(self._rng(index))[0]

    def example(self, index):
        """``(attributes, PIL image, caption)`` of item ``index``."""
        rng = self._rng(index)
        attributes, is_pair = self._draw_attributes(rng)
        if is_pair:
            return attributes, render_pair(attributes, self.size, rng), pair_caption(attributes, rng)
        image = render(attributes, self.size, rng)
        return attributes, image, caption_for(attributes, rng)

    def __getitem__(self, index):
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} out of range for length {self.length}")
        attributes, image, caption = self.example(index)
        item = {
            self.image_key: np.asarray(image, dtype=np.float32) / 127.5 - 1.0,
            self.caption_key: caption,
        }
        if self.attributes_key:
            item[self.attributes_key] = attributes
        return item


class ShapesTrain(ShapesDataset):
    def __init__(self, **kwargs):
        super().__init__(split="train", **kwargs)


class ShapesValidation(ShapesDataset):
    def __init__(self, **kwargs):
        kwargs.setdefault("length", 500)
        super().__init__(split="validation", **kwargs)
