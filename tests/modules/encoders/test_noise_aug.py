"""Reading the unCLIP CLIP-embedding statistics file: good files load, bad ones are one line."""
import os

import numpy as np
import pytest
import torch

from ldm.errors import UserError
from ldm.modules.encoders.noise_aug import CLIPEmbeddingNoiseAugmentation, load_clip_stats

SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "timesteps": 10}


def augmentor(stats_path):
    return CLIPEmbeddingNoiseAugmentation(noise_schedule_config=SCHEDULE, timestep_dim=4,
                                          clip_stats_path=str(stats_path))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "ViT-L-14_stats.th"
    torch.save((torch.arange(4.0), torch.full((4,), 2.0)), path)
    return path


def test_stats_load_into_the_augmentor(stats_file):
    mean, std = load_clip_stats(stats_file)
    assert torch.equal(mean, torch.arange(4.0)) and torch.equal(std, torch.full((4,), 2.0))
    assert torch.equal(augmentor(stats_file).scale(torch.arange(4.0)[None]), torch.zeros(1, 4))


def write_bad_stats(kind, path, marker):
    if kind == "truncated":
        torch.save((torch.zeros(4), torch.ones(4)), path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "garbage pickle":
        path.write_bytes(b"\x80\x02garbage that is not a pickle")
    elif kind == "noise":
        path.write_bytes(np.random.RandomState(0).bytes(512))
    elif kind == "runs code":
        torch.save((torch.zeros(4), RunsCode(str(marker))), path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not tensors":
        torch.save(("mean", "std"), path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is not a readable PyTorch file"),
    ("garbage pickle", "is not a readable PyTorch file"),
    ("noise", "is not a readable PyTorch file"),
    ("runs code", "needs code execution to load (posix.mkdir)"),
    ("empty", "is empty (0 bytes)"),
    ("not tensors", "must hold a (mean, std) pair of tensors"),
])
def test_bad_stats_file_is_one_line(tmp_path, kind, message):
    marker = tmp_path / "code-ran"
    path = write_bad_stats(kind, tmp_path / "stats.th", marker)
    with pytest.raises(UserError) as err:
        augmentor(path)
    text = str(err.value)
    assert text.startswith(f"CLIP embedding statistics file '{path}'") and message in text, text
    assert "\n" not in text and not marker.exists()


def test_missing_stats_file_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match="does not exist; download ViT-L-14_stats.th"):
        load_clip_stats(tmp_path / "absent.th")
