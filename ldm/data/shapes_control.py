"""Shapes with a ControlNet hint: a binary mask of the region where the shape is drawn.

The hint is the shape's bounding box, white on black, so it says where (and how large) but not
what: the caption names colour and shape (and background), never the position, which is the hint's
to give. Half of the items place the shape anywhere inside the margins rather than at one of the
five named positions, so a ControlNet trained on them follows a region drawn anywhere.

The hint is drawn at ``hint_size`` pixels (the latent size times the hint encoder's 8x: 128 for the
shipped model's 64-pixel images and 16-pixel latents), HxWx3 in [0, 1] as ControlNet datasets give it.
"""
import numpy as np
import torch

from ldm.data.shapes import (
    MARGIN,
    SPLIT_IDS,
    caption_for,
    sample_attributes,
    shape_geometry,
)
from ldm.data.shapes_vocabulary import draw_shapes, shape_reach
from ldm.errors import UserError


def region_box(shape, cx, cy, extent):
    """The shape's bounding box (x0, y0, x1, y1) in fractions of the side."""
    left, right, up, down = shape_reach(shape, extent)
    return cx - left, cy - up, cx + right, cy + down


def region_mask(box, size):
    """[size, size] bool: the pixels whose centres lie inside ``box`` (fractions of the side)."""
    centres = (np.arange(int(size)) + 0.5) / int(size)
    x0, y0, x1, y1 = box
    inside_x = (centres >= x0) & (centres <= x1)
    inside_y = (centres >= y0) & (centres <= y1)
    return inside_y[:, None] & inside_x[None, :]


def region_hint(box, size):
    """The hint image for ``box``: float32 [size, size, 3], 1 inside the region and 0 outside."""
    return np.repeat(region_mask(box, size)[..., None], 3, axis=-1).astype(np.float32)


def free_geometry(shape, extent, rng):
    """(cx, cy) anywhere the shape fits inside the margins, uniformly."""
    left, right, up, down = shape_reach(shape, extent)
    cx = rng.uniform(MARGIN + left, 1 - MARGIN - right)
    cy = rng.uniform(MARGIN + up, 1 - MARGIN - down)
    return float(cx), float(cy)


class ShapesControl(torch.utils.data.Dataset):
    """Items ``{image_key: [H, W, 3] in [-1, 1], caption_key: str, hint_key: [h, h, 3] in [0, 1]}``.

    Item ``i`` depends only on ``(seed, split, i)``. ``free_fraction`` of the items place the shape
    uniformly inside the margins, the rest at a named position as :mod:`ldm.data.shapes` does. The
    train split leaves out the held-out (colour, shape) pairs, as the base model's training did.
    """

    def __init__(self, split="train", size=64, hint_size=128, length=10000, seed=0, free_fraction=0.5,
                 image_key="image", caption_key="caption", hint_key="hint"):
        if split not in SPLIT_IDS:
            raise UserError(f"shapes split must be one of {', '.join(SPLIT_IDS)}, got {split!r}")
        if not 0.0 <= float(free_fraction) <= 1.0:
            raise UserError(f"free_fraction must be from 0 to 1, got {free_fraction}")
        if int(length) < 1 or int(size) < 16 or int(hint_size) < 16:
            raise UserError(f"ShapesControl needs length >= 1 and sizes >= 16 pixels, got length {length}, "
                            f"size {size}, hint_size {hint_size}")
        self.split, self.size, self.hint_size = split, int(size), int(hint_size)
        self.length, self.seed, self.free_fraction = int(length), int(seed), float(free_fraction)
        self.image_key, self.caption_key, self.hint_key = image_key, caption_key, hint_key

    def __len__(self):
        return self.length

    def example(self, index):
        """(attributes, (cx, cy, extent), PIL image, caption) of item ``index``."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], 7, int(index)])
        attributes = sample_attributes(rng, self.split)
        cx, cy, extent = shape_geometry(attributes, rng)
        if rng.random() < self.free_fraction:
            cx, cy = free_geometry(attributes["shape"], extent, rng)
        image = draw_shapes(self.size, attributes["background"],
                            [(attributes["shape"], attributes["colour"], cx, cy, extent)])
        named = {key: value for key, value in attributes.items() if key != "position"}
        return attributes, (cx, cy, extent), image, caption_for(named, rng)

    def __getitem__(self, index):
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} out of range for length {self.length}")
        attributes, (cx, cy, extent), image, caption = self.example(index)
        box = region_box(attributes["shape"], cx, cy, extent)
        return {
            self.image_key: np.asarray(image, dtype=np.float32) / 127.5 - 1.0,
            self.caption_key: caption,
            self.hint_key: region_hint(box, self.hint_size),
        }
