"""The personalisation concepts are drawn as captioned and their readers see them (and nothing else)."""
import numpy as np
import pytest

from ldm.data.shapes import ShapesTrain, describe
from ldm.data.shapes_concepts import (
    INSTANCE,
    ShapesConcept,
    concept_colour,
    is_outline,
    is_pastel,
    is_pattern,
    outline_share,
    pastel_colour,
    pattern_copies,
    read_shape,
    reads_as_instance,
)
from ldm.errors import UserError


def test_new_colour_reads_back_and_its_word_is_in_the_caption():
    data = ShapesConcept("colour", word="cyan", length=60)
    for i in range(60):
        attributes, image, caption = data.example(i)
        seen = describe(image)
        assert concept_colour(image) == "cyan"
        assert (seen["shape"], seen["position"]) == (attributes["shape"], attributes["position"])
        assert "cyan" in caption.split() and attributes["colour"] not in caption.split(), caption


def test_outlines_are_seen_and_filled_shapes_are_not():
    outlines = ShapesConcept("outline", length=80)
    filled = ShapesTrain(length=80)
    assert all(is_outline(outlines.example(i)[1]) for i in range(80))
    assert not any(is_outline(filled.example(i)[1]) for i in range(80))
    # outline captions are the ordinary ones: the style comes from the adapter, not a word
    assert outlines.example(3)[2] == outlines.example(3)[2].split(",")[0]


def test_outline_word_is_appended_when_given():
    assert ShapesConcept("outline", word="lineart", length=4).example(0)[2].endswith(", lineart")


def test_pastel_tints_read_as_the_tint_of_their_colour_and_plain_colours_do_not():
    pastel = ShapesConcept("pastel", length=120)
    plain = ShapesTrain(length=120)
    for i in range(120):
        attributes, image, caption = pastel.example(i)
        seen = describe(image)
        assert pastel_colour(image) == f"pastel {attributes['colour']}", caption
        assert is_pastel(image) and is_pastel(image, attributes["colour"])
        # the tint changes the paint only: shape and position read as drawn
        assert (seen["shape"], seen["position"]) == (attributes["shape"], attributes["position"])
        # ordinary captions: the style comes from the adapter, not a word
        assert "pastel" not in caption
    for i in range(120):
        attributes, image, _ = plain.example(i)
        assert pastel_colour(image) == attributes["colour"] and not is_pastel(image)


def test_patterns_read_as_four_copies_of_the_captioned_shape_and_single_shapes_do_not():
    pattern = ShapesConcept("pattern", length=90)
    plain = ShapesTrain(length=90)
    for i in range(90):
        attributes, image, caption = pattern.example(i)
        assert pattern_copies(image) == [(attributes["colour"], attributes["shape"])] * 4, caption
        assert is_pattern(image, attributes["colour"], attributes["shape"])
        assert "pattern" not in caption
        assert is_pattern(plain.example(i)[1]) is False
    other_colour = "red" if attributes["colour"] != "red" else "blue"
    assert not is_pattern(image, colour=other_colour)


def test_instance_is_one_shape_in_many_places():
    data = ShapesConcept("instance", word="sks", length=40)
    places = set()
    for i in range(40):
        attributes, image, caption = data.example(i)
        assert caption.startswith(f"a sks {INSTANCE['shape']}")
        assert reads_as_instance(image, {"position": attributes["position"], "background": attributes["background"]})
        places.add((attributes["position"], attributes["background"]))
    assert len(places) > 5


def test_stars_read_as_stars_and_the_vocabulary_shapes_as_themselves():
    stars = ShapesConcept("star", length=60)
    for i in range(60):
        attributes, image, caption = stars.example(i)
        seen = describe(image)
        assert read_shape(image) == "star", caption
        assert "star" in caption.split() and attributes["shape"] == "star"
        # colour, size and position are read as for any shape: the star only adds a template
        assert concept_colour(image) == attributes["colour"]
        assert seen["position"] == attributes["position"]
    shapes = ShapesTrain(length=80)
    for i in range(80):
        attributes, image, _ = shapes.example(i)
        assert read_shape(image) == attributes["shape"]


def test_object_is_the_instance_named_by_its_word_alone():
    instance, obj = ShapesConcept("instance", length=12), ShapesConcept("object", length=12)
    for i in range(12):
        attributes, image, caption = obj.example(i)
        assert caption.startswith("a zwx") and INSTANCE["shape"] not in caption
        assert reads_as_instance(image, {"position": attributes["position"], "background": attributes["background"]})
    # its own images, not the instance concept's
    assert any(obj.example(i)[0] != instance.example(i)[0] for i in range(12))


def test_instance_reader_refuses_other_shapes():
    _, image, _ = ShapesTrain(length=50).example(0)
    seen = describe(image)
    assert reads_as_instance(image) == all(seen[k] == v for k, v in INSTANCE.items())


def test_blank_image_has_no_colour_or_outline():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert concept_colour(blank) is None and outline_share(blank) is None and is_outline(blank) is None
    assert pastel_colour(blank) is None and is_pastel(blank) is None and is_pattern(blank) is None


def test_items_are_deterministic_arrays_in_model_range():
    a, b = ShapesConcept("colour", length=3)[1], ShapesConcept("colour", length=3)[1]
    assert a["image"].shape == (64, 64, 3) and a["image"].min() >= -1 and a["image"].max() <= 1
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    with pytest.raises(IndexError):
        ShapesConcept("colour", length=3)[3]


def test_unknown_concept_is_refused():
    with pytest.raises(UserError, match="concept must be one of"):
        ShapesConcept("glitter")
