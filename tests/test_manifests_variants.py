"""The inpainting, depth, x4-upscaling and unCLIP configs build models whose state dicts match the
official checkpoints key for key (same approach as test_manifests.py: full size, parameters on meta).

Refresh the local manifest copies with ``python tests/test_manifests_variants.py --refresh``.
"""
import pytest
import torch
from omegaconf import OmegaConf

from official_manifests import (build_on_meta, check_all_fp32, check_copy_is_current, check_state_dict, load_config,
                                load_manifest, refresh_main)

MANIFESTS = ["v2-inpainting-inference", "v2-midas-inference", "x4-upscaling", "v2-1-stable-unclip-l-inference",
             "v2-1-stable-unclip-h-inference"]

# Official unCLIP-L reads the Karlo CLIP statistics from this path, relative to the working directory.
KARLO_STATS = "checkpoints/karlo_models/ViT-L-14_stats.th"


@pytest.fixture
def karlo_stats(tmp_path, monkeypatch):
    """A working directory holding a (mean, std) statistics file where the unCLIP-L config expects it."""
    path = tmp_path / KARLO_STATS
    path.parent.mkdir(parents=True)
    torch.save((torch.zeros(768), torch.ones(768)), path)
    monkeypatch.chdir(tmp_path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", MANIFESTS)
def test_state_dict_matches_official(name, karlo_stats):
    state = build_on_meta(load_config(name)).state_dict()
    check_state_dict(name, load_manifest(name), state)
    check_all_fp32(state)


@pytest.mark.parametrize("name", MANIFESTS)
def test_config_matches_official(name):
    ours = OmegaConf.to_container(load_config(name), resolve=True)
    assert list(ours) == ["model"]
    assert ours["model"] == load_manifest(name)["model_config"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_local_manifest_copy_is_current(name):
    check_copy_is_current(name, "python tests/test_manifests_variants.py --refresh")


if __name__ == "__main__":
    refresh_main("test_manifests_variants.py", MANIFESTS)
