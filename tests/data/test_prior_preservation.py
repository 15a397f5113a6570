"""Instance and class examples in every batch, with their loss weights."""
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.prior_preservation import (
    LOSS_WEIGHT_KEY,
    PRIOR_KEY,
    PriorPreservationDataset,
    merge_prior_examples,
)
from ldm.errors import UserError


class Captions(torch.utils.data.Dataset):
    def __init__(self, name, length):
        self.name, self.length = name, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {"image": np.full((4, 4, 3), index, dtype=np.float32), "caption": f"{self.name} {index}"}


def test_items_pair_an_instance_with_a_class_example():
    data = PriorPreservationDataset(Captions("sks", 3), Captions("class", 7), prior_loss_weight=0.5)
    assert len(data) == 7
    item = data[4]
    assert item["caption"] == "sks 1" and item[LOSS_WEIGHT_KEY] == 1.0   # 4 % 3
    assert item[PRIOR_KEY]["caption"] == "class 4" and item[PRIOR_KEY][LOSS_WEIGHT_KEY] == 0.5
    assert data[-1][PRIOR_KEY]["caption"] == "class 6"


def test_datasets_can_be_configs():
    shapes = {"target": "ldm.data.shapes_concepts.ShapesConcept", "params": {"concept": "instance", "length": 2,
                                                                             "size": 16}}
    data = PriorPreservationDataset(shapes, dict(shapes, params=dict(shapes["params"], length=5)))
    assert len(data) == 5 and data[3]["caption"].startswith("a sks triangle")


def test_merged_batch_is_instances_then_classes_with_their_weights():
    data = PriorPreservationDataset(Captions("sks", 2), Captions("class", 2), prior_loss_weight=0.25)
    batch = merge_prior_examples(default_collate([data[0], data[1]]))
    assert set(batch) == {"image", "caption", LOSS_WEIGHT_KEY}
    assert batch["caption"] == ["sks 0", "sks 1", "class 0", "class 1"]
    assert batch["image"].shape == (4, 4, 4, 3)
    assert batch[LOSS_WEIGHT_KEY].tolist() == [1.0, 1.0, 0.25, 0.25]
    plain = {"image": torch.zeros(2), "caption": ["a", "b"]}
    assert merge_prior_examples(plain) is plain


def test_every_shuffled_batch_mixes_both_halves():
    data = {"target": "ldm.data.prior_preservation.PriorPreservationDataset",
            "params": {"instance": {"target": "ldm.data.shapes_concepts.ShapesConcept",
                                    "params": {"concept": "instance", "length": 3, "size": 16}},
                       "prior": {"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 16, "length": 9,
                                                                                    "attributes_key": None}}}}
    module = DataModuleFromConfig(batch_size=3, train=data, num_workers=0)
    module.setup()
    for batch in module.train_dataloader():
        merged = merge_prior_examples(batch)
        assert all("sks" in c for c in merged["caption"][:3]) and not any("sks" in c for c in merged["caption"][3:])


@pytest.mark.parametrize("prior,weight,message", [
    (Captions("class", 2), -1.0, "prior_loss_weight"),
    (Captions("class", 0), 1.0, "no examples"),
])
def test_bad_settings_are_user_errors(prior, weight, message):
    with pytest.raises(UserError, match=message):
        PriorPreservationDataset(Captions("sks", 2), prior, prior_loss_weight=weight)


def test_examples_of_different_kinds_are_refused():
    class Other(Captions):
        def __getitem__(self, index):
            return {"jpg": np.zeros((4, 4, 3), dtype=np.float32), "caption": "x"}
    with pytest.raises(UserError, match="must have the keys of the instance examples"):
        PriorPreservationDataset(Captions("sks", 2), Other("class", 2))[0]


def test_keys_only_the_class_examples_have_are_left_out():
    # the base model's training set as the prior: its items also carry the drawn attributes
    from ldm.data.shapes import ShapesTrain
    from ldm.data.shapes_concepts import ShapesConcept
    assert "attributes" in ShapesTrain(size=16, length=3)[0]
    dataset = PriorPreservationDataset(ShapesConcept("instance", length=2, size=16), ShapesTrain(size=16, length=3))
    item = dataset[1]
    assert set(item[PRIOR_KEY]) == set(item) - {PRIOR_KEY} == {"image", "caption", LOSS_WEIGHT_KEY}
