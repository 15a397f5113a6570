"""The inpainting, depth, x4-upscaling and unCLIP configs build models whose state dicts match the
official checkpoints key for key (same approach as test_manifests.py: full size, parameters on meta).

Refresh the local manifest copies with ``python tests/test_manifests_variants.py --refresh``.
"""
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from test_manifests import (CONFIGS, DATA, SHARED, SHOW, build_on_meta, compact_manifest, describe_differences,
                            load_manifest)

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


def load_config(name):
    return OmegaConf.load(CONFIGS / f"{name}.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("name", MANIFESTS)
def test_state_dict_matches_official(name, karlo_stats):
    manifest = load_manifest(name)
    state = build_on_meta(load_config(name)).state_dict()
    ours = {key: list(tensor.shape) for key, tensor in state.items()}
    report = describe_differences(ours, manifest["state_dict"])
    assert not report, f"{name}.yaml vs {manifest['config_file']}:\n{report}"
    not_fp32 = [f"{k}: {t.dtype}" for k, t in state.items() if t.dtype != torch.float32]
    assert not not_fp32, f"{len(not_fp32)} non-fp32 entries, e.g. {not_fp32[:SHOW]}"


@pytest.mark.parametrize("name", MANIFESTS)
def test_config_matches_official(name):
    ours = OmegaConf.to_container(load_config(name), resolve=True)
    assert list(ours) == ["model"]
    assert ours["model"] == load_manifest(name)["model_config"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_local_manifest_copy_is_current(name):
    shared = SHARED / f"{name}.json"
    if not shared.exists():
        pytest.skip(f"no shared reference manifests at {SHARED}")
    with open(shared) as f:
        reference = compact_manifest(json.load(f))
    assert load_manifest(name) == reference, (
        f"tests/data/manifests/{name}.json differs from {shared}; "
        "run `python tests/test_manifests_variants.py --refresh`")


def refresh():
    for name in MANIFESTS:
        with open(SHARED / f"{name}.json") as f:
            compact = compact_manifest(json.load(f))
        with open(DATA / f"{name}.json", "w") as f:
            json.dump(compact, f, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {DATA / name}.json ({len(compact['state_dict'])} keys)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--refresh"]:
        sys.exit("usage: python tests/test_manifests_variants.py --refresh")
    refresh()
