"""What the shipped shapes model has never seen, for the personalisation proofs (issue 11).

Seven concepts, each drawn by :class:`ShapesConcept` and read back from pixels here:

- ``colour``: shapes in a colour outside the six of the vocabulary ("cyan", :data:`CONCEPT_COLOUR_RGB`),
  captioned with a trigger word in the colour's place ("a large cyan circle on the left"): what a
  textual-inversion embedding learns;
- ``outline``: the ordinary captions, but every shape drawn as an outline only: a style that a LoRA
  or a hypernetwork adds to every prompt;
- ``pastel``: the ordinary captions, but every shape painted in a pastel tint of its colour (the colour
  mixed with white, :func:`pastel_rgb`): a palette style (the shipped autoencoder, which knows six
  colours, cannot decode it: bench/personalise.py's ceiling);
- ``pattern``: the ordinary captions, but every shape drawn as a 2x2 pattern of four small copies,
  whatever size and position the caption names: a layout style that a LoRA or a hypernetwork adds to
  every prompt, coarse enough for the shipped model's attention layers (8x8 and 4x4 latents) to steer;
- ``star``: a new shape, a large five-pointed star, with the ordinary captions' other words ("a large
  red star on the left"): a shape a LoRA or a hypernetwork adds to the model's vocabulary;
- ``instance``: one particular shape (fixed colour, shape and size, :data:`INSTANCE`) in random
  positions on random backgrounds, captioned "a sks triangle ...": the DreamBooth subject, whose
  class ("triangle") the base model already draws;
- ``object``: the same instance captioned by its trigger word alone ("a zwx on the left"): what a
  textual-inversion embedding of an object learns (colour, shape and size in one new word).

The readers use :func:`ldm.data.shapes_describe.measure` and only widen its palette or its shapes, look
at the shape's inside or read each quarter of a pattern as one shape, so :func:`describe` itself and the
fidelity numbers stay as they are.
"""
import numpy as np
import torch
from PIL import Image

from ldm.data.shapes import (
    POSITION_PHRASES,
    _caption,
    _check_size,
    _random_caption,
    caption_for,
    sample_attributes,
    shape_geometry,
)
from ldm.data.shapes_describe import (
    EXTRA_FILL,
    IDEAL_FILL,
    MIN_SHAPE_PIXELS,
    _border_colour,
    _largest_component,
    _nearest,
    _shape_mask,
    _to_pil,
    drawn_pixels,
    measure,
)
from ldm.data.shapes_vocabulary import COLOUR_RGB, draw_shapes
from ldm.errors import UserError

# Cyan is >= 140/255 from every vocabulary colour and >= 165/255 from every background.
CONCEPT_COLOUR_RGB = {"cyan": (0, 200, 210)}
# Outline width as a fraction of the side: 2 pixels at 64x64, so even a small triangle keeps a hole.
OUTLINE_WIDTH = 0.03
# A shape is read as an outline when the background-coloured hole inside it is at least this share of
# the area it encloses (dataset images: filled shapes 0, outlines 0.19 to 0.77).
OUTLINE_HOLE_SHARE = 0.1
INSTANCE = {"colour": "orange", "shape": "triangle", "size": "large"}
CONCEPTS = ("colour", "outline", "instance", "object", "star", "pastel", "pattern")
# ``pattern``: four small copies on a 2x2 grid, centred this far from the middle (fractions of the side).
PATTERN_OFFSET = 0.2
PATTERN_EXTENT = (0.16, 0.2)
# Share of white in a pastel tint: every tint is then >= 100/255 from every vocabulary colour and >= 70/255
# from every background, so the reader tells a tint from its colour and still finds the shape on white.
PASTEL_WHITE = 0.5


def pastel_rgb(colour):
    """The pastel tint of vocabulary colour ``colour``: its RGB mixed with white."""
    return tuple(round(c + PASTEL_WHITE * (255 - c)) for c in COLOUR_RGB[colour])


PASTEL_RGB = {f"pastel {colour}": pastel_rgb(colour) for colour in COLOUR_RGB}


def _caption_with_word(attributes, rng, word):
    """A caption that always names the colour, as ``word``, and each other attribute but the shape
    with probability 1/2 (``caption_for`` may drop the colour, which would leave nothing to learn)."""
    include = {"colour"} | {key for key in ("size", "position", "background") if rng.random() < 0.5}
    return _caption({**attributes, "colour": word}, include)


class ShapesConcept(torch.utils.data.Dataset):
    """Items ``{image_key: HxWx3 float32 in [-1, 1], caption_key: str}`` of one ``concept`` (see the
    module doc), drawn from the index like :class:`ldm.data.shapes.ShapesDataset`.

    ``word``: the trigger word in captions (``colour``: the colour's place, default "cyan";
    ``instance``: before the class noun, default "sks"; ``object``: in the noun's place, default "zwx";
    ``star``: the shape's name, default "star"; ``outline``, ``pastel`` and ``pattern`` captions have none
    unless given, then it is appended as ", <word>"). ``colour_rgb`` overrides the concept colour.
    """

    def __init__(self, concept="colour", word=None, length=32, size=64, seed=0, colour_rgb=None,
                 image_key="image", caption_key="caption"):
        if concept not in CONCEPTS:
            raise UserError(f"shapes concept must be one of {', '.join(CONCEPTS)}, got {concept!r}")
        if int(length) < 1:
            raise UserError(f"shapes concept dataset length must be positive, got {length}")
        _check_size(size)
        self.concept = concept
        default_words = {"colour": "cyan", "instance": "sks", "object": "zwx", "star": "star"}
        self.word = word if word is not None else default_words.get(concept, "")
        self.colour_rgb = tuple(colour_rgb) if colour_rgb is not None else CONCEPT_COLOUR_RGB["cyan"]
        self.length, self.size, self.seed = int(length), int(size), int(seed)
        self.image_key, self.caption_key = image_key, caption_key

    def __len__(self):
        return self.length

    def example(self, index):
        """``(attributes, PIL image, caption)`` of item ``index``."""
        rng = np.random.default_rng([self.seed, 17, CONCEPTS.index(self.concept), int(index)])
        attributes = sample_attributes(rng, "train")
        outline = None
        if self.concept == "colour":
            colour = self.colour_rgb
            caption = _caption_with_word(attributes, rng, self.word)
        elif self.concept in ("outline", "pastel"):
            if self.concept == "outline":
                colour, outline = attributes["colour"], OUTLINE_WIDTH
            else:
                colour = pastel_rgb(attributes["colour"])
            caption = caption_for(attributes, rng)
            caption = f"{caption}, {self.word}" if self.word else caption
        elif self.concept == "pattern":
            # size and position give way to the style: four small copies, one in each quarter
            caption = caption_for(attributes, rng)
            caption = f"{caption}, {self.word}" if self.word else caption
            extent = float(rng.uniform(*PATTERN_EXTENT))
            places = [(0.5 + sx * PATTERN_OFFSET, 0.5 + sy * PATTERN_OFFSET) for sy in (-1, 1) for sx in (-1, 1)]
            image = draw_shapes(self.size, attributes["background"],
                                [(attributes["shape"], attributes["colour"], cx, cy, extent) for cx, cy in places])
            return attributes, image, caption
        elif self.concept == "star":
            # Large only: a small star is 3 latent pixels wide, which the autoencoder rounds off into a
            # blob (bench/personalise.py measures this ceiling).
            attributes["size"] = "large"
            colour = attributes["colour"]
            caption = _random_caption({**attributes, "shape": self.word}, rng)
            attributes["shape"] = "star"
        else:
            attributes.update(INSTANCE)
            colour = attributes["colour"]
            caption = f"a {self.word} {INSTANCE['shape']}" if self.concept == "instance" else f"a {self.word}"
            for key, phrase in (("position", POSITION_PHRASES[attributes["position"]]),
                                ("background", f"on a {attributes['background']} background")):
                if rng.random() < 0.5:
                    caption += " " + phrase
        cx, cy, extent = shape_geometry(attributes, rng)
        image = draw_shapes(self.size, attributes["background"],
                            [(attributes["shape"], colour, cx, cy, extent)], outline=outline)
        return attributes, image, caption

    def __getitem__(self, index):
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"shapes concept index {index} out of range for length {self.length}")
        _, image, caption = self.example(index)
        return {self.image_key: np.asarray(image, dtype=np.float32) / 127.5 - 1.0, self.caption_key: caption}


def concept_colour(image, extra=None):
    """Nearest colour name of the shape in ``image`` over the vocabulary's six and ``extra``
    (default :data:`CONCEPT_COLOUR_RGB`), or ``None`` when no shape stands out."""
    stats = measure(image)
    if "shape_rgb" not in stats:
        return None
    return _nearest(stats["shape_rgb"], {**COLOUR_RGB, **(CONCEPT_COLOUR_RGB if extra is None else extra)})


def pastel_colour(image):
    """Nearest colour name of the shape in ``image`` over the vocabulary's six and their pastel tints
    ("red" or "pastel red"), or ``None`` when no shape stands out."""
    return concept_colour(image, extra=PASTEL_RGB)


def is_pastel(image, colour=None):
    """Whether the shape in ``image`` is painted in a pastel tint (of vocabulary colour ``colour`` when
    given); ``None`` when no shape stands out."""
    seen = pastel_colour(image)
    if seen is None:
        return None
    return seen == f"pastel {colour}" if colour else seen.startswith("pastel ")


def _components(mask):
    """Sizes and centroids (fractions of the side) of the 4-connected regions of ``mask``."""
    remaining, found = mask.copy(), []
    while remaining.any():
        region = _largest_component(remaining)
        ys, xs = np.nonzero(region)
        found.append((int(region.sum()), ((xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0])))
        remaining &= ~region
    return found


def pattern_copies(image):
    """The four copies of a 2x2 pattern in ``image``, each as ``(colour, shape)`` read from its quarter of
    the image (enlarged to the full side, where :func:`read_shape` reads it as it reads one shape), in
    reading order; ``None`` when ``image`` is not four shapes of about one size, one in each quarter."""
    return _pattern_copies(image, drawn_pixels(image))


def _pattern_copies(image, drawn):
    regions = [(size, centre) for size, centre in _components(drawn) if size >= MIN_SHAPE_PIXELS]
    if len(regions) != 4 or max(s for s, _ in regions) > 2 * min(s for s, _ in regions):
        return None
    if len({(cx > 0.5, cy > 0.5) for _, (cx, cy) in regions}) != 4:
        return None
    pil = _to_pil(image)
    half = pil.width // 2
    copies = []
    for top in (0, half):
        for left in (0, half):
            quarter = pil.crop((left, top, left + half, top + half)).resize(pil.size, Image.BICUBIC)
            copies.append((concept_colour(quarter, extra={}), read_shape(quarter)))
    return copies


def is_pattern(image, colour=None, shape=None):
    """Whether ``image`` shows a 2x2 pattern of four copies (each in ``colour`` and read as ``shape`` when
    given); ``None`` when nothing stands out."""
    drawn = drawn_pixels(image)
    if not drawn.any():
        return None
    copies = _pattern_copies(image, drawn)
    if copies is None:
        return False
    return all((colour is None or c == colour) and (shape is None or s == shape) for c, s in copies)


def _reachable_from_border(free):
    """Pixels of the boolean mask ``free`` connected (4-neighbourhood) to the image border."""
    reached = np.zeros_like(free)
    reached[0], reached[-1], reached[:, 0], reached[:, -1] = free[0], free[-1], free[:, 0], free[:, -1]
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= free
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def outline_share(image):
    """Share of the area a shape encloses that is background-coloured (its hole): ~0 for a filled
    shape, 0.19-0.77 for a drawn outline; ``None`` when no shape stands out."""
    rgb = np.asarray(_to_pil(image), dtype=np.float32) / 255
    mask = _shape_mask(rgb, _border_colour(rgb))
    if mask is None or mask.sum() == 0:
        return None
    enclosed = ~_reachable_from_border(~mask)
    return float((enclosed & ~mask).sum() / enclosed.sum())


def is_outline(image):
    """Whether the shape in ``image`` is drawn as an outline (``None``: no shape)."""
    share = outline_share(image)
    return None if share is None else share >= OUTLINE_HOLE_SHARE


def read_shape(image, shapes=(*IDEAL_FILL, *EXTRA_FILL)):
    """Best-fitting of ``shapes`` (by default the vocabulary's and the star) for the shape in ``image``,
    as :func:`ldm.data.shapes.describe` fits its three; ``None`` when no shape stands out."""
    misfit = measure(image, shapes=shapes).get("misfit")
    return None if misfit is None else min(misfit, key=misfit.get)


def reads_as_instance(image, attributes=None):
    """Whether ``image`` shows :data:`INSTANCE` (colour, shape, size) and, for the keys of
    ``attributes`` given (e.g. position, background), those too."""
    from ldm.data.shapes import describe
    seen = describe(image)
    wanted = {**INSTANCE, **(attributes or {})}
    return all(seen.get(key) == value for key, value in wanted.items())


__all__ = [
    "CONCEPTS",
    "CONCEPT_COLOUR_RGB",
    "INSTANCE",
    "OUTLINE_WIDTH",
    "PASTEL_RGB",
    "ShapesConcept",
    "concept_colour",
    "is_outline",
    "is_pastel",
    "is_pattern",
    "outline_share",
    "pastel_colour",
    "pastel_rgb",
    "pattern_copies",
    "read_shape",
    "reads_as_instance",
]
