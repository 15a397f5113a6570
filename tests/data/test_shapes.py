import hashlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFilter

from ldm.data.shapes import (ATTRIBUTES, BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, POSITION_PHRASES,
                             POSITIONS, SHAPES, SIZES, ShapesDataset, ShapesTrain, ShapesValidation,
                             caption_for, describe, parse_prompt, prompt_set, render)
from ldm.errors import UserError
from ldm.util import instantiate_from_config

VOCABULARY = set(SHAPES + COLOURS + BACKGROUNDS + SIZES) | {
    word for phrase in POSITION_PHRASES.values() for word in phrase.split()} | {
    "a", "an", "on", "background"}


def _accuracy(dataset, n, corrupt=lambda image: image):
    correct = sum(describe(corrupt(image)) == attributes
                  for attributes, image, _ in map(dataset.example, range(n)))
    return correct / n


def _fingerprint(dataset, indices):
    digest = hashlib.sha256()
    for i in indices:
        item = dataset[i]
        digest.update(item["image"].tobytes())
        digest.update(item["caption"].encode())
    return digest.hexdigest()


def test_item_depends_only_on_seed_split_and_index():
    first, second = ShapesTrain(length=50, seed=3), ShapesTrain(length=50, seed=3)
    # Read the second instance backwards: no state may carry from one item to the next.
    backwards = {i: second[i] for i in reversed(range(50))}
    for i in range(50):
        assert np.array_equal(first[i]["image"], backwards[i]["image"])
        assert first[i]["caption"] == backwards[i]["caption"]
    assert _fingerprint(first, range(10)) != _fingerprint(ShapesTrain(length=50, seed=4), range(10))


def test_item_is_identical_in_another_process():
    # A fresh interpreter with another str-hash salt must draw the very same items.
    code = ("import hashlib; from ldm.data.shapes import ShapesTrain; d = ShapesTrain(length=20, seed=1);"
            "h = hashlib.sha256(); [h.update(d[i]['image'].tobytes()) or h.update(d[i]['caption'].encode())"
            " for i in range(20)]; print(h.hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="123", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == _fingerprint(ShapesTrain(length=20, seed=1), range(20))


def test_splits_differ():
    train, validation = ShapesTrain(length=20), ShapesValidation(length=20)
    assert _fingerprint(train, range(20)) != _fingerprint(validation, range(20))
    assert sum(train.attributes(i) == validation.attributes(i) for i in range(20)) < 5


def test_held_out_pairs_never_in_train_but_in_validation():
    train = ShapesTrain(length=5000, seed=11)
    seen = {(a["colour"], a["shape"]) for a in map(train.attributes, range(5000))}
    assert seen == set(itertools.product(COLOURS, SHAPES)) - set(HELD_OUT_PAIRS)
    # attributes() is the cheap path; it must agree with what __getitem__ returns.
    assert all(train[i]["attributes"] == train.attributes(i) for i in range(0, 5000, 250))
    validation = ShapesValidation(length=1000, seed=11)
    seen = {(a["colour"], a["shape"]) for a in map(validation.attributes, range(1000))}
    assert set(HELD_OUT_PAIRS) <= seen


def test_item_format_and_configurable_keys():
    item = ShapesDataset(split="validation", size=32, length=5, image_key="jpg", caption_key="txt")[4]
    assert set(item) == {"jpg", "txt", "attributes"}
    assert item["jpg"].dtype == np.float32 and item["jpg"].shape == (32, 32, 3)
    assert item["jpg"].min() >= -1 and item["jpg"].max() <= 1
    assert item["jpg"].min() < -0.5 or item["jpg"].max() > 0.5
    assert isinstance(item["txt"], str)
    with pytest.raises(IndexError):
        ShapesTrain(length=5)[5]


def test_yaml_target_and_bad_arguments():
    dataset = instantiate_from_config({"target": "ldm.data.shapes.ShapesTrain",
                                       "params": {"length": 7, "size": 64, "seed": 2}})
    assert len(dataset) == 7 and dataset.split == "train"
    with pytest.raises(UserError):
        ShapesDataset(split="test")
    with pytest.raises(UserError):
        render({"shape": "hexagon", "colour": "red", "background": "white", "size": "small",
                "position": "left"})


def test_captions_use_only_the_vocabulary_and_name_true_attributes():
    dataset = ShapesTrain(length=400)
    lengths = set()
    for i in range(400):
        attributes = dataset.attributes(i)
        caption = dataset.example(i)[2]
        assert set(caption.split()) <= VOCABULARY, caption
        named = parse_prompt(caption)
        assert named["shape"] == attributes["shape"]
        assert all(attributes[key] == value for key, value in named.items())
        lengths.add(len(named))
    assert lengths == {1, 2, 3, 4, 5}


def test_parse_prompt_round_trips_captions():
    rng = np.random.default_rng(0)
    for values in itertools.islice(itertools.product(SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS),
                                   0, None, 7):
        attributes = dict(zip(("size", "colour", "shape", "position", "background"), values))
        assert parse_prompt(caption_for(attributes)) == attributes
        short = parse_prompt(caption_for(attributes, rng))
        assert short.items() <= attributes.items() and "shape" in short
    assert caption_for({"shape": "circle", "colour": "orange"}) == "an orange circle"
    assert parse_prompt("A big Square in the centre, on a grey background") == {
        "shape": "square", "position": "center", "background": "gray"}
    with pytest.raises(UserError):
        parse_prompt("a red circle and a blue circle")


def test_prompt_set_covers_vocabulary_and_held_out_pairs():
    prompts = prompt_set(200, seed=0)
    assert len(prompts) == 200 and prompts == prompt_set(200, seed=0) != prompt_set(200, seed=1)
    parsed = [parse_prompt(p) for p in prompts]
    assert {(a["colour"], a["shape"]) for a in parsed} == set(itertools.product(COLOURS, SHAPES))
    for key, values in (("size", SIZES), ("position", POSITIONS), ("background", BACKGROUNDS)):
        assert {a[key] for a in parsed if key in a} == set(values)
    assert sum(len(a) == len(ATTRIBUTES) for a in parsed) >= 100
    with pytest.raises(UserError):
        prompt_set(10)


def test_describe_reads_canonical_geometry():
    # Step 7 is coprime with every vocabulary size, so each value of each attribute comes up.
    for values in itertools.islice(itertools.product(SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS),
                                   0, None, 7):
        attributes = dict(zip(("shape", "colour", "background", "size", "position"), values))
        assert describe(render(attributes)) == attributes


def test_describe_accuracy_on_dataset_images():
    assert _accuracy(ShapesValidation(length=500, seed=21), 500) >= 0.99


def test_describe_accuracy_under_blur_and_noise():
    rng = np.random.default_rng(0)

    def corrupt(image):
        soft = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) / 255
        return np.clip(soft + rng.normal(0, 0.05, soft.shape), 0, 1)

    assert _accuracy(ShapesValidation(length=300, seed=22), 300, corrupt) >= 0.95


def test_describe_accepts_dataset_arrays_and_any_size():
    large = ShapesValidation(length=3, size=192, seed=5)
    for i in range(3):
        item = large[i]
        assert describe(item["image"]) == item["attributes"]  # float [-1, 1], 192x192
        as_uint8 = np.round((item["image"] + 1) * 127.5).astype(np.uint8)
        assert describe(as_uint8) == item["attributes"]


def test_describe_blank_image_names_only_the_background():
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    assert describe(blank) == {"colour": None, "shape": None, "size": None, "position": None,
                               "background": "black"}
    with pytest.raises(UserError):
        describe(np.zeros((64, 64), dtype=np.uint8))


def ldm_data_imports(path):
    """The ``ldm.data`` modules that ``path`` imports anywhere in it (function bodies included)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("ldm.data.")}


def test_shapes_modules_do_not_import_each_other_in_a_cycle():
    folder = Path(__file__).resolve().parents[2] / "ldm" / "data"
    graph = {f"ldm.data.{path.stem}": ldm_data_imports(path) for path in folder.glob("*.py")}

    def cycle_from(module, trail):
        if module in trail:
            return trail[trail.index(module):] + [module]
        for imported in sorted(graph.get(module, ())):
            found = cycle_from(imported, trail + [module])
            if found:
                return found
        return None

    cycles = [cycle for cycle in map(lambda m: cycle_from(m, []), sorted(graph)) if cycle]
    assert cycles == []
    assert "ldm.data.shapes_describe" in graph["ldm.data.shapes"]   # shapes.describe is the reader's
