"""What the shipped shapes model has never seen, for the personalisation proofs (issue 11).

Five concepts, each drawn by :class:`ShapesConcept` and read back from pixels here:

- ``colour``: shapes in a colour outside the six of the vocabulary ("cyan", :data:`CONCEPT_COLOUR_RGB`),
  captioned with a trigger word in the colour's place ("a large cyan circle on the left"): what a
  textual-inversion embedding learns;
- ``outline``: the ordinary captions, but every shape drawn as an outline only: a style that a LoRA
  or a hypernetwork adds to every prompt;
- ``star``: a new shape, a large five-pointed star, with the ordinary captions' other words ("a large
  red star on the left"): a shape a LoRA or a hypernetwork adds to the model's vocabulary;
- ``instance``: one particular shape (fixed colour, shape and size, :data:`INSTANCE`) in random
  positions on random backgrounds, captioned "a sks triangle ...": the DreamBooth subject, whose
  class ("triangle") the base model already draws;
- ``object``: the same instance captioned by its trigger word alone ("a zwx on the left"): what a
  textual-inversion embedding of an object learns (colour, shape and size in one new word).

The readers use :func:`ldm.data.shapes_describe.measure` and only widen its palette or its shapes or look
at the shape's inside, so :func:`describe` itself and the fidelity numbers stay as they are.
"""
import numpy as np
import torch

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
    _border_colour,
    _nearest,
    _shape_mask,
    _to_pil,
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
CONCEPTS = ("colour", "outline", "instance", "object", "star")


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
    ``star``: the shape's name, default "star"; ``outline`` captions have none unless given, then it is
    appended as ", <word>"). ``colour_rgb`` overrides the concept colour.
    """

    def __init__(self, concept="colour", word=None, length=32, size=64, seed=0, colour_rgb=None,
                 image_key="image", caption_key="caption"):
        if concept not in CONCEPTS:
            raise UserError(f"shapes concept must be one of {', '.join(CONCEPTS)}, got {concept!r}")
        if int(length) < 1:
            raise UserError(f"shapes concept dataset length must be positive, got {length}")
        _check_size(size)
        self.concept = concept
        self.word = word if word is not None else {"colour": "cyan", "instance": "sks", "object": "zwx", "star": "star",
                                                  "outline": ""}[concept]
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
        elif self.concept == "outline":
            colour, outline = attributes["colour"], OUTLINE_WIDTH
            caption = caption_for(attributes, rng)
            caption = f"{caption}, {self.word}" if self.word else caption
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
    "ShapesConcept",
    "concept_colour",
    "is_outline",
    "outline_share",
    "read_shape",
    "reads_as_instance",
]
