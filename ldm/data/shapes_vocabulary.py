"""The shapes vocabulary and what each word looks like: the words per attribute, the RGB palette, the
size ranges and the outline of each shape.

Shared by the dataset that draws the words (:mod:`ldm.data.shapes`) and the reader that recovers
them from pixels (:mod:`ldm.data.shapes_describe`); both import this module and not each other.
Geometry is in fractions of the image side. :func:`draw_shapes` is the one drawing routine of the
one- and two-shape scenes.
"""
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


def shape_reach(shape, extent):
    """Distance from the centroid to the bounding box: (left, right, up, down)."""
    half = extent / 2
    if shape == "triangle":
        # Apex up: the centroid sits 2/3 of the height below the apex.
        return half, half, 2 * extent / 3, extent / 3
    return half, half, half, half


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
        else:
            pen.polygon([(x, y - up), (x + right, y + down), (x - left, y + down)], **paint)
    return canvas.reduce(SUPERSAMPLE)


def with_article(words):
    """``words`` joined after "a" or "an" as the first word needs."""
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + list(words))
