"""Instance and class examples side by side, for DreamBooth's prior-preservation loss.

DreamBooth (Ruiz et al. 2023, eq. 2) fine-tunes on a few instance images ("a sks triangle") and,
in the same step, on images the model itself drew for the class ("a triangle"), so that the class
keeps looking as it did: loss = instance loss + prior_loss_weight * class loss. diffusers'
train_dreambooth.py puts both kinds into every batch; here each item of
:class:`PriorPreservationDataset` is one instance example carrying one class example under
:data:`PRIOR_KEY`, and :func:`merge_prior_examples` turns a collated batch of them into one batch
with a per-item ``loss_weight`` (1 for instance examples, ``prior_loss_weight`` for class ones),
which ``ldm.models.personalise.dreambooth.DreamBooth`` applies to its diffusion loss.
"""
from collections.abc import Mapping

import torch

from ldm.errors import UserError
from ldm.util import instantiate_from_config

PRIOR_KEY = "prior"
LOSS_WEIGHT_KEY = "loss_weight"


class PriorPreservationDataset(torch.utils.data.Dataset):
    """Item ``i``: instance example ``i % len(instance)`` with ``loss_weight`` 1, and under
    :data:`PRIOR_KEY` class example ``i % len(prior)`` with ``loss_weight`` ``prior_loss_weight``;
    ``max(len(instance), len(prior))`` items, as diffusers pairs them.

    ``instance`` and ``prior`` are dataset configs (``target``/``params``) or datasets whose items
    have the same keys (e.g. two :class:`ldm.data.captioned_folder.CaptionedImageFolder`); keys only
    the class examples have are left out, so the base model's own training set (e.g.
    :class:`ldm.data.shapes.ShapesTrain`, which also carries its drawn ``attributes``) can be the prior.
    """

    def __init__(self, instance, prior, prior_loss_weight=1.0):
        if float(prior_loss_weight) < 0:
            raise UserError(f"prior_loss_weight must be 0 or more, got {prior_loss_weight}")
        self.instance = _dataset(instance)
        self.prior = _dataset(prior)
        self.prior_loss_weight = float(prior_loss_weight)

    def __len__(self):
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"prior-preservation index {index} out of range for length {len(self)}")
        item = dict(self.instance[index % len(self.instance)], **{LOSS_WEIGHT_KEY: 1.0})
        prior = dict(self.prior[index % len(self.prior)], **{LOSS_WEIGHT_KEY: self.prior_loss_weight})
        if not item.keys() <= prior.keys():
            raise UserError(f"class examples must have the keys of the instance examples, got {sorted(item)} and "
                            f"{sorted(prior)}")
        prior = {key: prior[key] for key in item}
        item[PRIOR_KEY] = prior
        return item


def _dataset(config_or_dataset):
    is_config = isinstance(config_or_dataset, Mapping)  # dicts and OmegaConf nodes
    dataset = instantiate_from_config(config_or_dataset) if is_config else config_or_dataset
    if len(dataset) == 0:
        raise UserError(f"{type(dataset).__name__} has no examples")
    return dataset


def merge_prior_examples(batch):
    """A collated batch of :class:`PriorPreservationDataset` items as one batch: the instance
    examples, then the class examples (tensors concatenated along the batch, lists joined). A batch
    without :data:`PRIOR_KEY` is returned as it is."""
    if PRIOR_KEY not in batch:
        return batch
    prior = batch[PRIOR_KEY]
    merged = {}
    for key, value in batch.items():
        if key == PRIOR_KEY:
            continue
        if isinstance(value, torch.Tensor):
            merged[key] = torch.cat([value, prior[key].to(value)])
        else:
            merged[key] = list(value) + list(prior[key])
    return merged
