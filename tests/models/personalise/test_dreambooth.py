"""DreamBooth on the tiny model: the weighted loss, what trains, a run through main.py with prior
preservation, its export, and the scripts that write the instance and class folders."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import main as train_main
from ldm.class_images import (
    generate_class_images,
    shows_shapes_prompt,
    with_shapes_phrases,
)
from ldm.data.captioned_folder import write_dataset_items
from ldm.data.prior_preservation import (
    LOSS_WEIGHT_KEY,
    PriorPreservationDataset,
    merge_prior_examples,
)
from ldm.data.shapes import parse_prompt
from ldm.data.shapes_concepts import ShapesConcept
from ldm.errors import UserError

DREAMBOOTH = "ldm.models.personalise.dreambooth.DreamBooth"
FROZEN_PREFIXES = ("cond_stage_model.", "first_stage_model.")


def dreambooth_config(tiny, **params):
    config = tiny.config(first_stage_key="image", cond_stage_key="caption", **params)
    config["model"]["target"] = DREAMBOOTH
    return config


def shapes_batch(n=4):
    concept = ShapesConcept("instance", length=n, size=16)
    items = [concept[i] for i in range(n)]
    return {"image": torch.from_numpy(np.stack([it["image"] for it in items])),
            "caption": [it["caption"] for it in items]}


def loss_of(model, batch, weights=None, seed=0):
    batch = dict(batch)
    if weights is not None:
        batch[LOSS_WEIGHT_KEY] = torch.tensor(weights, dtype=torch.float64)   # as default_collate makes them
    torch.manual_seed(seed)   # the same timesteps, noise and latent draws for every call
    loss, _ = model.shared_step(batch)
    return loss


@pytest.fixture(scope="module")
def models(tiny):
    base = tiny.build(tiny.config(first_stage_key="image", cond_stage_key="caption"))
    dreambooth = tiny.build(dreambooth_config(tiny))
    dreambooth.load_state_dict(base.state_dict())
    return SimpleNamespace(base=base, dreambooth=dreambooth)


def test_all_weights_one_is_the_latent_diffusion_loss_exactly(models):
    batch = shapes_batch()
    expected = loss_of(models.base, batch)
    assert torch.equal(loss_of(models.dreambooth, batch), expected)
    assert torch.equal(loss_of(models.dreambooth, batch, weights=[1.0] * 4), expected)


def test_class_items_are_weighted_by_the_prior_loss_weight(models):
    batch, model = shapes_batch(), models.dreambooth
    instance = loss_of(model, batch, weights=[1, 1, 0, 0])
    prior = loss_of(model, batch, weights=[0, 0, 1, 1])
    assert instance > 0 and prior > 0
    combined = loss_of(model, batch, weights=[1, 1, 0.3, 0.3])
    assert combined.item() == pytest.approx((instance + 0.3 * prior).item(), rel=1e-6)
    # the base loss is the unweighted mean over all four: instance and class halves at weight 1
    assert loss_of(models.base, batch).item() == pytest.approx((instance + prior).item(), rel=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_merges_prior_batches(models):
    instance, prior = ShapesConcept("instance", length=2, size=16), ShapesConcept("colour", length=2, size=16)
    data = PriorPreservationDataset(instance, prior, prior_loss_weight=0.5)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    merged = merge_prior_examples(batch)
    torch.manual_seed(0)
    loss = models.dreambooth.training_step(batch, 0)
    assert merged[LOSS_WEIGHT_KEY].tolist() == [1.0, 1.0, 0.5, 0.5] and merged["image"].shape[0] == 4
    assert torch.equal(loss, loss_of(models.dreambooth, merged))


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_only_the_unet_trains_unless_the_text_encoder_is_asked_for(tiny):
    # a base config's cond_stage_trainable does not decide: train_text_encoder does
    unet_only = tiny.build(dreambooth_config(tiny, cond_stage_trainable=True))
    optimised = {id(p) for p in unet_only.trainable_parameters()}
    assert optimised == {id(p) for p in unet_only.model.parameters()}
    assert not any(n.startswith(FROZEN_PREFIXES) for n in trainable_names(unet_only))
    with_text = tiny.build(dreambooth_config(tiny, train_text_encoder=True))
    optimised = {id(p) for p in with_text.trainable_parameters()}
    assert {id(p) for p in with_text.cond_stage_model.parameters()} <= optimised
    assert not any(n.startswith("first_stage_model.") for n in trainable_names(with_text))


KEY_VALUE = ["attn2.to_k", "attn2.to_v"]


def test_trainable_names_the_unet_parameters_that_fine_tune(tiny):
    custom = tiny.build(dreambooth_config(tiny, trainable=KEY_VALUE))
    names = {id(p): n for n, p in custom.model.named_parameters()}
    chosen = [names[id(p)] for p in custom.trainable_parameters()]
    assert chosen and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in chosen)
    assert len(chosen) == sum(".attn2.to_k." in n or ".attn2.to_v." in n for n in names.values())
    with pytest.raises(UserError, match="names no U-Net parameter"):
        tiny.build(dreambooth_config(tiny, trainable=["attn9"]))
    with pytest.raises(UserError, match="empty list"):
        tiny.build(dreambooth_config(tiny, trainable=[]))


# ---------------------------------------------------------------------------------------------- main.py

def run_config(tiny, tiny_files, folder):
    config = dreambooth_config(tiny, ckpt_path=str(tiny_files.safetensors), use_ema=False, monitor=None)
    config["model"]["base_learning_rate"] = 1e-3
    folder_dataset = "ldm.data.captioned_folder.CaptionedImageFolder"
    config["data"] = {"target": "main.DataModuleFromConfig", "params": {
        "batch_size": 2, "num_workers": 0,
        "train": {"target": "ldm.data.prior_preservation.PriorPreservationDataset", "params": {
            "prior_loss_weight": 1.0,
            "instance": {"target": folder_dataset, "params": {"folder": str(folder / "instance"), "size": 16}},
            "prior": {"target": folder_dataset, "params": {"folder": str(folder / "class"), "size": 16}}}}}}
    config["lightning"] = {"trainer": {"log_every_n_steps": 1, "enable_progress_bar": False,
                                       "enable_model_summary": False},
                           "callbacks": {"image_logger": {"params": {"batch_frequency": 2, "max_images": 4,
                                                                     "disabled": True}}}}
    return config


def train(config_path, logdir, steps, *overrides):
    assert train_main.main(["--base", str(config_path), "-t", "--accelerator", "cpu", "--max_steps", str(steps),
                            "--logdir", str(logdir), *overrides]) == 0
    (run,) = logdir.iterdir()
    return run, torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, tiny_files, tiny_model):
    folder = tmp_path_factory.mktemp("dreambooth")
    write_dataset_items(ShapesConcept("instance", length=4, size=16), folder / "instance")
    generate_class_images(tiny_model, with_shapes_phrases("a triangle", 3), folder / "class", 3, batch_size=2,
                          steps=2, scale=2.0)
    config = tiny.write_config(run_config(tiny, tiny_files, folder), folder / "tiny-dreambooth.yaml")
    run, ckpt = train(config, folder / "logs", 3)
    return SimpleNamespace(folder=folder, config=config, run=run, ckpt=ckpt)


def changed_prefixes(state_dict, base):
    return {key.split(".")[0] for key, value in state_dict.items()
            if key in base and not torch.equal(value, base[key])}


def test_main_fine_tunes_the_unet_and_leaves_the_rest_bit_identical(trained, tiny_files):
    assert trained.ckpt["global_step"] == 3
    sd = trained.ckpt["state_dict"]
    assert set(sd) == set(tiny_files.state_dict)
    assert changed_prefixes(sd, tiny_files.state_dict) == {"model"}
    assert not torch.equal(sd["model.diffusion_model.out.2.weight"],
                           tiny_files.state_dict["model.diffusion_model.out.2.weight"])
    # each step saw 2 instance and 2 class images
    assert trained.ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2 * 1e-3)


def test_text_encoder_trains_when_asked(trained, tiny_files):
    _, ckpt = train(trained.config, trained.folder / "logs-text", 2, "model.params.train_text_encoder=true")
    assert changed_prefixes(ckpt["state_dict"], tiny_files.state_dict) == {"model", "cond_stage_model"}


def test_trainable_fine_tunes_only_the_named_weights(trained, tiny_files):
    _, ckpt = train(trained.config, trained.folder / "logs-kv", 2, "model.params.trainable=[attn2.to_k,attn2.to_v]")
    base = tiny_files.state_dict
    changed = {key for key, value in ckpt["state_dict"].items() if not torch.equal(value, base[key])}
    assert changed and all(".attn2.to_k." in key or ".attn2.to_v." in key for key in changed)


def test_export_weights_gives_an_inference_checkpoint(trained, tiny_files, scripts, tmp_path):
    from ldm.checkpoint import load_model
    out = tmp_path / "sks.safetensors"
    assert scripts.load("export_weights").main([str(trained.run / "checkpoints" / "last.ckpt"), str(out)]) == 0
    model = load_model(tiny_files.config, out, device="cpu")   # strict: every key of the plain LatentDiffusion
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[key], trained.ckpt["state_dict"][key])


# ---------------------------------------------------------------------------------------------- scripts

def test_class_image_script_skips_images_already_there(scripts, tiny_files, tmp_path, capsys):
    script = scripts.load("generate_class_images")
    out = tmp_path / "class"
    args = ["--class-prompt", "a triangle", "--shapes-phrases", "--steps", "2", "--batch-size", "2",
            "--outdir", str(out), *scripts.model_flags(tiny_files)]
    assert script.main(args + ["--n", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"0000{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    captions = [(out / f"0000{i}.txt").read_text().strip() for i in range(3)]
    assert all(c.startswith("a triangle") and parse_prompt(c)["shape"] == "triangle" for c in captions)
    kept = (out / "00000.png").stat().st_mtime_ns
    (out / "00001.txt").unlink()   # an image without its caption was not finished
    capsys.readouterr()
    assert script.main(args + ["--n", "4"]) == 0
    assert "2 class images written, 2 already there" in capsys.readouterr().out
    assert (out / "00000.png").stat().st_mtime_ns == kept
    assert (out / "00001.txt").is_file() and (out / "00003.txt").is_file()
    assert script.main(["--outdir", str(out)]) == 2   # no class prompt


def test_refused_class_images_are_redrawn_with_new_seeds_then_kept(models, tmp_path):
    def draw(folder, accept=None, max_redraws=8):
        paths = generate_class_images(models.base, "a triangle", folder, 3, batch_size=2, steps=2, accept=accept,
                                      max_redraws=max_redraws)
        return [np.asarray(Image.open(p)) for p in sorted(paths)]

    plain = draw(tmp_path / "plain")
    seen = []

    def refuse_first_sight(prompt, image):
        seen.append(np.asarray(image))
        return any(np.array_equal(seen[-1], p) for p in plain) is False

    curated = draw(tmp_path / "curated", refuse_first_sight)
    assert len(seen) == 6   # each image refused once, accepted on its first redraw
    assert not any(np.array_equal(c, p) for c in curated for p in plain)
    calls = []
    kept = draw(tmp_path / "never", lambda prompt, image: calls.append(prompt) and False, max_redraws=2)
    assert len(kept) == 3 and len(calls) == 3 * 3   # refused every time: kept after the last redraw


def test_shapes_check_accepts_what_the_prompt_names():
    from ldm.data.shapes import render
    image = render({"shape": "circle", "colour": "red", "background": "white", "size": "large", "position": "left"})
    assert shows_shapes_prompt("a large red circle on the left", image)
    assert shows_shapes_prompt("a circle", image)
    assert not shows_shapes_prompt("a blue circle", image)
    assert not shows_shapes_prompt("a red circle on the right on a black background", image)


def test_shapes_phrases_vary_position_and_background():
    prompts = with_shapes_phrases("a triangle", 40, seed=1)
    assert prompts == with_shapes_phrases(["a triangle"], 40, seed=1)
    parsed = [parse_prompt(p) for p in prompts]
    assert "a triangle" in prompts and all(p["shape"] == "triangle" and "colour" not in p for p in parsed)
    assert len({p.get("position") for p in parsed}) == 6 and len({p.get("background") for p in parsed}) == 4


def test_instance_image_script(scripts, tmp_path):
    out = tmp_path / "instance"
    assert scripts.load("shapes_concept_images").main(["instance", str(out), "--n", "2", "--size", "16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt"]
    assert (out / "00000.txt").read_text().startswith("a sks triangle")
