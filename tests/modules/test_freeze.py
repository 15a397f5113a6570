"""``ldm.modules.freeze``: the one freeze helper of models, encoders and losses."""
import copy
import pickle

import torch
from torch import nn

from ldm.modules.freeze import disabled_train, freeze_module


def test_a_frozen_module_stays_in_eval_mode_when_its_parent_trains():
    frozen = freeze_module(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    parent = nn.Sequential(nn.Linear(2, 2), frozen).train()
    assert parent.training and parent[0].training
    assert not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in parent[0].parameters())
    x = torch.randn(4, 2)
    torch.testing.assert_close(frozen(x), frozen(x))  # dropout stays off


def test_a_frozen_module_stays_frozen_through_pickle_and_deepcopy():
    original = freeze_module(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    for clone in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
        assert clone.train() is clone and not any(m.training for m in clone.modules())
        assert not any(p.requires_grad for p in clone.parameters())
        torch.testing.assert_close(clone[0].weight, original[0].weight)


def test_the_official_import_paths_name_the_one_helper():
    from ldm.models.diffusion.ddpm import disabled_train as from_ddpm
    from ldm.modules.encoders.base import freeze_module as from_base
    from ldm.modules.encoders.modules import disabled_train as from_encoders
    assert from_ddpm is disabled_train and from_encoders is disabled_train
    assert from_base is freeze_module


def test_frozen_encoders_stay_in_eval_mode():
    from ldm.modules.encoders.modules import FrozenOpenCLIPImageEmbedder
    from tiny_models import TINY_OPENCLIP
    encoder = FrozenOpenCLIPImageEmbedder(arch=TINY_OPENCLIP).train()
    assert not any(m.training for m in encoder.model.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
