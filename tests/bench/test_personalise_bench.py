"""bench/personalise.py: the parts that need no training. The autoencoder ceiling on the shipped model (what
any U-Net-side method can reach per concept), the trigger-word prompts, and a bad --run refused."""
import importlib.util
import sys
from pathlib import Path

import pytest

from ldm.data.shapes import parse_prompt

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SHIPPED = REPO / "models" / "shapes"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_personalise", BENCH / "personalise.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.skipif(not (SHIPPED / "shapes-ldm.safetensors").exists(), reason="shipped model not in this checkout")
def test_shipped_autoencoder_keeps_outlines_stars_patterns_and_the_object_but_not_new_colours(bench):
    from ldm.checkpoint import load_model
    model = load_model(SHIPPED / "shapes-ldm.yaml", SHIPPED / "shapes-ldm.safetensors", device="cpu")
    ceiling = bench.autoencoder_ceiling(model, n=24)
    assert {concept: cell["n"] for concept, cell in ceiling.items()} == {
        "colour": 24, "outline": 24, "object": 24, "star": 24, "pastel": 24, "pattern": 24}
    # it decodes cyan shapes as green, and pastel tints as their colours: no prompt vector, LoRA or
    # hypernetwork can draw a colour outside the six on this model
    assert ceiling["colour"]["rate"] == 0.0
    assert ceiling["pastel"]["rate"] == 0.0
    assert ceiling["pattern"]["rate"] == 1.0
    assert ceiling["object"]["rate"] == 1.0
    assert ceiling["star"]["rate"] == 1.0
    assert ceiling["outline"]["rate"] >= 0.8


def test_trigger_word_prompts_name_every_place_and_background(bench):
    named = bench.named_prompts("zwx")
    assert named[0] == ("a zwx", {})
    wanted = [w for _, w in named[1:]]
    assert len(wanted) == len({tuple(sorted(w.items())) for w in wanted}) == 15
    for prompt, w in named[1:]:
        assert prompt.startswith("a zwx ")
        read = parse_prompt(prompt.replace("zwx", "red circle"))
        assert (read["position"], read["background"]) == (w["position"], w["background"])


def test_star_prompts_ask_for_a_star_in_every_colour_and_place(bench):
    named = bench.star_prompts()
    assert named[0] == ("a star", None)
    assert len(named) == len({p for p, _ in named}) == 1 + 6 + 30
    for prompt, colour in named[1:]:
        read = parse_prompt(prompt.replace("star", "circle"))
        assert "star" in prompt.split() and read["colour"] == colour and read.get("size") in (None, "large")


def test_style_rates_read_the_style_and_what_the_prompt_asked_for(bench):
    from ldm.data.shapes import ShapesTrain
    from ldm.data.shapes_concepts import ShapesConcept
    pattern = ShapesConcept("pattern", length=6)
    items = [pattern.example(i) for i in range(6)]
    prompts = [f"a {a['colour']} {a['shape']}" for a, _, _ in items]
    images = {0: [im for _, im, _ in items]}
    rates = bench._style_rates("pattern", images, prompts)
    assert rates == {"at_1": {"rate": 1.0, "n": 6}, "as_asked_at_1": {"rate": 1.0, "n": 6}}
    # the same patterns asked for in another colour are the style but not as asked
    recoloured = [p.replace(a["colour"], "red" if a["colour"] != "red" else "blue")
                  for p, (a, _, _) in zip(prompts, items)]
    assert bench._style_rates("pattern", images, recoloured)["as_asked_at_1"]["rate"] == 0.0
    plain = ShapesTrain(length=6)
    assert bench._style_rates("pattern", {0: [plain.example(i)[1] for i in range(6)]}, prompts)["at_1"]["rate"] == 0.0


def test_concept_is_read_from_the_run_folders_project_config(bench, tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "2026-12-03T05-00-00-project.yaml").write_text(
        "data:\n  params:\n    train:\n      params:\n        concept: star\n")
    assert bench.trained_concept(tmp_path) == "star"


def test_a_resumed_runs_latest_project_config_is_read(bench, tmp_path):
    (tmp_path / "configs").mkdir()
    for stamp, concept in (("2026-12-03T05-00-00", "outline"), ("2026-12-03T06-30-00", "star")):
        (tmp_path / "configs" / f"{stamp}-project.yaml").write_text(
            f"data:\n  params:\n    train:\n      params:\n        concept: {concept}\n")
    assert bench.trained_concept(tmp_path) == "star"


def test_concept_is_read_from_the_instance_beside_regularisation_images(bench, tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "2026-12-03T05-00-00-project.yaml").write_text(
        "data:\n  params:\n    train:\n      target: ldm.data.prior_preservation.PriorPreservationDataset\n"
        "      params:\n        instance:\n          params: {concept: star, length: 256}\n"
        "        prior:\n          params: {size: 64}\n")
    assert bench.trained_concept(tmp_path) == "star"


def test_run_of_an_unknown_method_is_refused_in_one_line(bench, tmp_path, capsys):
    assert bench.main(["--run", f"dreamboth={tmp_path}", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "METHOD=RUN_DIR" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_class_images_are_drawn_only_for_a_prior_folder(bench):
    assert not bench._prior_is_a_folder("configs/personalise/shapes-dreambooth.yaml")
    assert bench._prior_is_a_folder("configs/personalise/shapes-dreambooth-generated-prior.yaml")
