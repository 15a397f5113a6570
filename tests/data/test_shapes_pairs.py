"""Two-shape scenes: drawing, captions, prompts, the dataset mix, and reading scenes back."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import (ALL_PAIRS, HELD_OUT_PAIRS, TRAIN_PAIRS, ShapesDataset, describe_pair, pair_caption,
                             pair_prompt_set, parse_pair_prompt, render_pair)
from ldm.data.shapes_vocabulary import BACKGROUND_RGB, COLOUR_RGB
from ldm.errors import UserError

SCENE = {"background": "black", "objects": [{"colour": "red", "shape": "circle", "position": "left"},
                                            {"colour": "blue", "shape": "square", "position": "right"}]}


def test_render_puts_each_shape_in_its_half_with_a_gap_at_the_middle():
    image = np.asarray(render_pair(SCENE, 64))
    red = np.all(image == COLOUR_RGB["red"], axis=-1)
    blue = np.all(image == COLOUR_RGB["blue"], axis=-1)
    assert red.sum() > 50 and blue.sum() > 50
    assert np.nonzero(red)[1].max() < 30 and np.nonzero(blue)[1].min() > 33
    # the middle columns and the border are background only
    assert np.all(image[:, 30:34] == BACKGROUND_RGB["black"])
    assert np.all(image[:2] == BACKGROUND_RGB["black"]) and np.all(image[:, -2:] == BACKGROUND_RGB["black"])


def test_caption_and_prompt_round_trip():
    assert pair_caption(SCENE) == "a red circle on the left and a blue square on the right on a black background"
    assert parse_pair_prompt(pair_caption(SCENE)) == SCENE
    # right object named first, no background, other capitalisation
    parsed = parse_pair_prompt("A Blue square on the right and a red circle on the left")
    assert parsed == {"background": None, "objects": SCENE["objects"]}
    assert parse_pair_prompt("an orange triangle on the left and a green circle on the right")["objects"][0] == \
        {"colour": "orange", "shape": "triangle", "position": "left"}
    assert parse_pair_prompt("a red circle on the left") is None


@pytest.mark.parametrize("prompt, message", [
    ("a red circle on the left and a blue square on the left", "both shapes on the left"),
    ("a red star on the left and a blue square on the right", "'red star' is not"),
    ("a red circle on the left and a blue square on the right on a pink background", "background 'pink'"),
])
def test_impossible_pair_prompts(prompt, message):
    with pytest.raises(UserError, match=message):
        parse_pair_prompt(prompt)


def test_random_captions_vary_order_and_background():
    rng = np.random.default_rng(0)
    captions = {pair_caption(SCENE, rng) for _ in range(40)}
    assert captions == {
        "a red circle on the left and a blue square on the right on a black background",
        "a red circle on the left and a blue square on the right",
        "a blue square on the right and a red circle on the left on a black background",
        "a blue square on the right and a red circle on the left",
    }
    assert all(parse_pair_prompt(c)["objects"] == SCENE["objects"] for c in captions)


def test_dataset_mixes_scenes_and_keeps_held_out_pairs_out_of_training():
    train = ShapesDataset("train", length=600, pair_fraction=0.4)
    scenes = [train.attributes(i) for i in range(600)]
    pairs = [s for s in scenes if "objects" in s]
    assert 190 < len(pairs) < 290
    seen = {(o["colour"], o["shape"]) for s in pairs for o in s["objects"]}
    assert seen == set(TRAIN_PAIRS) and not seen & set(HELD_OUT_PAIRS)
    assert all(s["objects"][0] != s["objects"][1] for s in pairs)
    attributes, image, caption = train.example(next(i for i, s in enumerate(scenes) if "objects" in s))
    assert parse_pair_prompt(caption)["objects"] == attributes["objects"] and image.size == (64, 64)
    # items batch: attributes (whose keys differ between scenes and single shapes) are left out
    batch = torch.utils.data.default_collate([train[i] for i in range(16)])
    assert set(batch) == {"image", "caption"} and batch["image"].shape == (16, 64, 64, 3)
    # without scenes nothing changes: same items as before the option existed
    single = ShapesDataset("train", length=10)
    assert "attributes" in single[0] and single.attributes(3) == ShapesDataset("train", length=10).example(3)[0]


def test_validation_scenes_include_held_out_pairs():
    scenes = [ShapesDataset("validation", length=300, pair_fraction=1.0).attributes(i) for i in range(300)]
    assert {(o["colour"], o["shape"]) for s in scenes for o in s["objects"]} == set(ALL_PAIRS)


def test_describe_pair_reads_every_dataset_scene():
    dataset = ShapesDataset("validation", length=120, pair_fraction=1.0)
    for i in range(120):
        scene, image, _ = dataset.example(i)
        got = describe_pair(image)
        assert got["background"] == scene["background"]
        for obj in scene["objects"]:
            assert got[obj["position"]] == {"colour": obj["colour"], "shape": obj["shape"]}, (i, scene, got)


def test_describe_pair_sees_swapped_colours_and_missing_shapes():
    swapped = {"background": "black", "objects": [{"colour": "blue", "shape": "circle", "position": "left"},
                                                  {"colour": "red", "shape": "square", "position": "right"}]}
    got = describe_pair(render_pair(swapped))
    assert got["left"] == {"colour": "blue", "shape": "circle"} and got["right"]["colour"] == "red"
    # a single shape on the left: the right half is empty
    only_left = np.asarray(render_pair(SCENE)).copy()
    only_left[:, 32:] = BACKGROUND_RGB["black"]
    got = describe_pair(Image.fromarray(only_left))
    assert got["right"] is None and got["left"] == {"colour": "red", "shape": "circle"}


def test_pair_prompt_set_is_balanced_and_parses():
    prompts = pair_prompt_set(ALL_PAIRS, 72)
    scenes = [parse_pair_prompt(p) for p in prompts]
    counts = {}
    for scene in scenes:
        for obj in scene["objects"]:
            counts[(obj["colour"], obj["shape"])] = counts.get((obj["colour"], obj["shape"]), 0) + 1
    assert set(counts) == set(ALL_PAIRS) and max(counts.values()) - min(counts.values()) <= 2
    assert sum(s["background"] is not None for s in scenes) == 36
