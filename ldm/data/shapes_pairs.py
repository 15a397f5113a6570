"""Two-shape scenes for the shapes dataset: one shape in each half of the image.

"a red circle on the left and a blue square on the right on a black background". A scene is
``{"background": name, "objects": [left, right]}`` with each object ``{"colour", "shape",
"position"}`` (position "left" or "right"). Each shape stays inside its half with a gap at the
middle, so :func:`ldm.data.shapes_describe.describe_pair` can read the halves apart. Both shapes have
the same medium size range (no size words): the scene is about which shape is where, in which
colour, so a colour on the wrong shape ("binding") is what the captions teach and the reader checks.
The held-out (colour, shape) pairs of the single-shape data stay out of training scenes too.
"""
import re

import numpy as np

from ldm.data.shapes_vocabulary import BACKGROUNDS, COLOURS, SHAPES, draw_shapes, with_article
from ldm.errors import UserError

SIDES = ("left", "right")
# Bounding-box extent of each shape, and its centroid's distance from the middle; the largest
# shape nearest the middle ends 0.5 - 0.21 + 0.16 = 0.45 across: 3 pixels short of it at 64x64.
PAIR_EXTENT_RANGE = (0.24, 0.32)
PAIR_OFFSET_RANGE = (0.21, 0.25)
PAIR_VERTICAL_JITTER = 0.08


def _check_scene(scene):
    objects = scene.get("objects")
    if scene.get("background") not in BACKGROUNDS:
        raise UserError(f"scene background must be one of {', '.join(BACKGROUNDS)}, got {scene.get('background')!r}")
    if not isinstance(objects, (list, tuple)) or [o.get("position") for o in objects] != list(SIDES):
        raise UserError("a scene has two objects, the left one first: [{..., 'position': 'left'}, "
                        "{..., 'position': 'right'}]")
    for obj in objects:
        if obj.get("colour") not in COLOURS or obj.get("shape") not in SHAPES:
            raise UserError(f"scene object {obj!r} needs a colour ({', '.join(COLOURS)}) and a shape "
                            f"({', '.join(SHAPES)})")


def sample_pair(rng, pairs):
    """A scene of two different (colour, shape) pairs from ``pairs`` on a random background."""
    first, second = rng.choice(len(pairs), size=2, replace=False)
    objects = [{"colour": pairs[i][0], "shape": pairs[i][1], "position": side}
               for i, side in zip((first, second), SIDES)]
    return {"background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))], "objects": objects}


def pair_geometry(obj, rng=None):
    """Centroid ``(cx, cy)`` and extent of a scene object (fractions of the side); the middle of each
    range without ``rng``."""
    def draw(low, high):
        return (low + high) / 2 if rng is None else float(rng.uniform(low, high))

    extent = draw(*PAIR_EXTENT_RANGE)
    offset = draw(*PAIR_OFFSET_RANGE)
    cx = 0.5 - offset if obj["position"] == "left" else 0.5 + offset
    return cx, 0.5 + draw(-PAIR_VERTICAL_JITTER, PAIR_VERTICAL_JITTER), extent


def render_pair(scene, size=64, rng=None):
    """Draw a two-shape scene (``PIL.Image``, RGB, ``size`` x ``size``), antialiased as :func:`render`."""
    _check_scene(scene)
    placed = [(obj["shape"], obj["colour"], *pair_geometry(obj, rng)) for obj in scene["objects"]]
    return draw_shapes(size, scene["background"], placed)


def _object_phrase(obj):
    return f"{with_article([obj['colour'], obj['shape']])} on the {obj['position']}"


def pair_caption(scene, rng_or_full=True):
    """"a red circle on the left and a blue square on the right on a black background".

    ``True`` gives the left object first and the background; a ``numpy.random.Generator`` names
    the right object first half the time and the background half the time.
    """
    _check_scene(scene)
    objects = list(scene["objects"])
    with_background = True
    if rng_or_full is not True:
        if not isinstance(rng_or_full, np.random.Generator):
            raise UserError("pair_caption needs rng_or_full=True or a numpy.random.Generator")
        if rng_or_full.random() < 0.5:
            objects.reverse()
        with_background = rng_or_full.random() < 0.5
    caption = " and ".join(_object_phrase(obj) for obj in objects)
    return caption + (f" on a {scene['background']} background" if with_background else "")


_OBJECT = r"an? (\w+) (\w+) on the (left|right)"
_PAIR_PROMPT = re.compile(rf"^\s*{_OBJECT} and {_OBJECT}(?: on an? (\w+) background)?\s*$", re.IGNORECASE)


def parse_pair_prompt(prompt):
    """The scene a two-shape prompt names (background ``None`` when it names none), or ``None`` when
    ``prompt`` is not of the form "a C S on the left and a C S on the right [on a B background]"."""
    match = _PAIR_PROMPT.match(prompt)
    if match is None:
        return None
    c1, s1, p1, c2, s2, p2, background = (g.lower() if g else g for g in match.groups())
    if p1 == p2:
        raise UserError(f"prompt {prompt!r} puts both shapes on the {p1}; name one left and one right")
    objects = sorted([{"colour": c1, "shape": s1, "position": p1}, {"colour": c2, "shape": s2, "position": p2}],
                     key=lambda obj: SIDES.index(obj["position"]))
    for obj in objects:
        if obj["colour"] not in COLOURS or obj["shape"] not in SHAPES:
            raise UserError(f"prompt {prompt!r}: '{obj['colour']} {obj['shape']}' is not a colour and a shape "
                            "of the shapes vocabulary")
    if background is not None and background not in BACKGROUNDS:
        raise UserError(f"prompt {prompt!r}: background '{background}' is not one of {', '.join(BACKGROUNDS)}")
    return {"background": background, "objects": objects}


def pair_prompt_set(pairs, n, seed=0):
    """``n`` two-shape prompts whose objects come from ``pairs`` (each about equally often), every other
    prompt naming the background, every other two naming the right shape first."""
    rng = np.random.default_rng([int(seed), 11])
    slots = []
    while len(slots) < 2 * n:
        slots.extend(rng.permutation(len(pairs)).tolist())
    prompts = []
    for i in range(n):
        left, right = slots[2 * i], slots[2 * i + 1]
        if left == right:
            right = (right + 1 + int(rng.integers(len(pairs) - 1))) % len(pairs)
        scene = {"background": BACKGROUNDS[i % len(BACKGROUNDS)],
                 "objects": [{"colour": pairs[j][0], "shape": pairs[j][1], "position": side}
                             for j, side in zip((left, right), SIDES)]}
        named = scene["objects"] if (i // 2) % 2 == 0 else scene["objects"][::-1]
        caption = " and ".join(_object_phrase(obj) for obj in named)
        prompts.append(caption + (f" on a {scene['background']} background" if i % 2 == 0 else ""))
    return prompts
