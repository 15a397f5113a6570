"""The committed personalisation configs (configs/personalise/shapes-*.yaml) build on the shipped model: their
model and dataset instantiate, the adapter is the only thing that trains, and the captions carry what the
adapter learns (the README recipes run these files as they are)."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs" / "personalise"
SHIPPED = REPO / "models" / "shapes" / "shapes-ldm.safetensors"

pytestmark = pytest.mark.skipif(not SHIPPED.exists(), reason="shipped model not in this checkout")


def _built(name, monkeypatch):
    monkeypatch.chdir(REPO)  # base_config / base_ckpt are repository paths
    config = OmegaConf.load(CONFIGS / name)
    return config, instantiate_from_config(config.model), instantiate_from_config(config.data.params.train)


@pytest.mark.parametrize("name", ["shapes-textual-inversion.yaml", "shapes-lora.yaml", "shapes-hypernetwork.yaml",
                                  "shapes-hypernetwork-star.yaml"])
def test_adapter_config_builds_and_trains_only_its_adapter(name, monkeypatch):
    config, model, data = _built(name, monkeypatch)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    adapter = {id(p) for p in model.adapter_parameters()}
    assert adapter and trainable == adapter
    assert not any(p.requires_grad for p in model.base.parameters())
    item = data[0]
    assert item["image"].shape == (64, 64, 3) and isinstance(item["caption"], str)
    assert config.lightning.trainer.max_steps > 0


def test_hypernetwork_config_teaches_the_pattern_style_from_ordinary_captions(monkeypatch):
    from ldm.data.shapes import parse_prompt
    config, model, data = _built("shapes-hypernetwork.yaml", monkeypatch)
    assert data.concept == "pattern" and config.model.params.name == "pattern"
    for i in range(8):
        attributes, _, caption = data.example(i)
        assert parse_prompt(caption)["shape"] == attributes["shape"] and "pattern" not in caption


def test_textual_inversion_config_teaches_a_new_word_for_the_object(monkeypatch):
    config, model, data = _built("shapes-textual-inversion.yaml", monkeypatch)
    word = config.model.params.token
    assert data.concept == "object" and data.word == word
    assert all(data[i]["caption"].split()[1] == word for i in range(8))
    # the vectors start from another shape's word, not from the answer
    assert config.model.params.init_word not in ("orange", "triangle", "large")
    assert model.vectors.shape[0] == config.model.params.n_vectors
    with torch.no_grad(), model.attached():
        cond = model.base.get_learned_conditioning([f"a {word}", "a circle"])
    assert torch.isfinite(cond).all()


def test_lora_config_teaches_the_star_shape_on_res_blocks_too(monkeypatch):
    from ldm.data.prior_preservation import PRIOR_KEY, PriorPreservationDataset
    from ldm.data.shapes import parse_prompt
    from ldm.data.shapes_concepts import read_shape
    config, _, data = _built("shapes-lora.yaml", monkeypatch)
    assert isinstance(data, PriorPreservationDataset) and config.model.params.name == "star"
    stars = data.instance
    assert stars.concept == "star"
    for i in range(8):
        _, image, caption = stars.example(i)
        assert "star" in caption.split() and read_shape(image) == "star"
    # beside each star image an ordinary one (kohya's regularisation images), none seen twice in the run
    assert data.prior_loss_weight == 1.0
    assert len(data.prior) == config.lightning.trainer.max_steps * config.data.params.batch_size
    ordinary = data[3][PRIOR_KEY]["caption"]
    assert parse_prompt(ordinary)["shape"] in ("circle", "square", "triangle") and "star" not in ordinary
    # the star's points are drawn at the 16x16 level, which has no attention: res blocks must adapt too
    assert "resnet" in config.model.params.targets


@pytest.mark.parametrize("name, prior", [
    ("shapes-dreambooth.yaml", "ldm.data.shapes.ShapesTrain"),   # the base model's training set
    ("shapes-dreambooth-generated-prior.yaml", "ldm.data.captioned_folder.CaptionedImageFolder"),   # its own images
])
def test_dreambooth_configs_pair_the_instance_with_a_prior(name, prior, tmp_path, monkeypatch):
    from ldm.data.captioned_folder import write_dataset_items
    from ldm.data.prior_preservation import PRIOR_KEY, PriorPreservationDataset
    from ldm.data.shapes_concepts import ShapesConcept
    config = OmegaConf.load(CONFIGS / name)
    train = config.data.params.train
    assert train.target == "ldm.data.prior_preservation.PriorPreservationDataset" and train.params.prior.target == prior
    assert config.model.params.ckpt_path == "models/shapes/shapes-ldm.safetensors"
    write_dataset_items(ShapesConcept("instance", length=2, size=64), tmp_path / "instance")
    train.params.instance.params.folder = str(tmp_path / "instance")
    if "folder" in train.params.prior.params:
        write_dataset_items(ShapesConcept("instance", length=3, size=64), tmp_path / "class")
        train.params.prior.params.folder = str(tmp_path / "class")
    else:   # one prior example per step's instance example: none seen twice
        assert train.params.prior.params.length == config.lightning.trainer.max_steps * config.data.params.batch_size
    dataset = instantiate_from_config(train)
    assert isinstance(dataset, PriorPreservationDataset)
    item = dataset[1]
    assert "sks" in item["caption"] and set(item[PRIOR_KEY]) == set(item) - {PRIOR_KEY}
