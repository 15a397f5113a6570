"""The shapes vocabulary and what each word looks like: the words per attribute, the RGB palette, the
size ranges and the outline of each shape.

Shared by the dataset that draws the words (:mod:`ldm.data.shapes`) and the reader that recovers
them from pixels (:mod:`ldm.data.shapes_describe`); both import this module and not each other.
Geometry is in fractions of the image side. :func:`draw_shapes` is the one drawing routine of the
one- and two-shape scenes.
"""
import math

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "black", "gray")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES = ("size", "colour", "shape", "position", "background")
VOCABULARY = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS, "size": SIZES,
              "position": POSITIONS}

# Chosen so that every pair of shape colours is >= 95/255 apart in RGB and every shape colour is
# >= 108/255 from every background (purple on gray is the closest).
COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 225, 25),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

# Bounding-box extent ranges per size category; the gap between them keeps size unambiguous.
EXTENT_RANGE = {"small": (0.18, 0.26), "large": (0.38, 0.46)}

# A five-pointed star, point up, is not in the vocabulary: the shape the shipped model has never drawn
# (ldm.data.shapes_concepts, concept "star"). Its inner corners sit at this share of the outer radius
# (0.38 would be the pentagram's; fatter points survive the 4x-downsampling autoencoder better).
STAR_INNER_RATIO = 0.5
# Bounding box of a star of outer radius 1: 2 sin 72 wide, 1 + cos 36 high.
_STAR_WIDTH = 2 * math.sin(math.radians(72))
_STAR_BELOW_CENTRE = math.cos(math.radians(36))


def shape_reach(shape, extent):
    """Distance from the centroid to the bounding box: (left, right, up, down)."""
    half = extent / 2
    if shape == "triangle":
        # Apex up: the centroid sits 2/3 of the height below the apex.
        return half, half, 2 * extent / 3, extent / 3
    if shape == "star":
        # Five-fold symmetric: the centroid is the centre of its points' circle. ``extent`` is the width.
        radius = star_radius(extent)
        return half, half, radius, radius * _STAR_BELOW_CENTRE
    return half, half, half, half


def star_radius(extent):
    """Outer radius of a star whose bounding box is ``extent`` wide."""
    return extent / _STAR_WIDTH


def star_corners(cx, cy, radius):
    """The ten corners of a point-up star centred at ``(cx, cy)``, outer and inner in turn (y down)."""
    corners = []
    for k in range(10):
        angle = math.radians(36 * k)
        r = radius if k % 2 == 0 else radius * STAR_INNER_RATIO
        corners.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    return corners


# Shapes are drawn this many times larger and box-downsampled: antialiased edges.
SUPERSAMPLE = 4


def draw_shapes(size, background, shapes, outline=None):
    """A ``size`` x ``size`` RGB image of the ``background`` colour (a name) with ``shapes`` drawn in
    order, each ``(shape, colour, cx, cy, extent)``: the shape's name, a colour name or an RGB tuple
    (colours outside the vocabulary, see :mod:`ldm.data.shapes_concepts`), the centroid and the
    bounding-box extent in fractions of the side. ``outline``: draw only the outline, this wide
    (fraction of the side), instead of a filled shape."""
    side = int(size) * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND_RGB[background])
    pen = ImageDraw.Draw(canvas)
    for shape, colour, cx, cy, extent in shapes:
        left, right, up, down = (r * side for r in shape_reach(shape, extent))
        x, y = cx * side, cy * side
        rgb = tuple(colour) if isinstance(colour, (tuple, list)) else COLOUR_RGB[colour]
        paint = {"fill": rgb} if outline is None else {"outline": rgb, "width": max(1, round(outline * side))}
        if shape == "circle":
            pen.ellipse([x - left, y - up, x + right, y + down], **paint)
        elif shape == "square":
            pen.rectangle([x - left, y - up, x + right, y + down], **paint)
        elif shape == "star":
            pen.polygon(star_corners(x, y, up), **paint)
        else:
            pen.polygon([(x, y - up), (x + right, y + down), (x - left, y + down)], **paint)
    return canvas.reduce(SUPERSAMPLE)


def with_article(words):
    """``words`` joined after "a" or "an" as the first word needs."""
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + list(words))
