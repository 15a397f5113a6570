"""Our configs build models whose state dicts match the official checkpoints key for key.

The spec is the reference manifest of each official config (every state-dict key and shape the
official code produces). A copy of the parts we need lives in tests/data/manifests so the test
runs in a plain clone; when ../shared/reference sits beside the repo the copy is also checked
against it. Models are built full size with every parameter on the meta device: no memory, no
weights (buffers stay real, since the DDPM schedule is computed from numpy at construction).

Refresh the copy with ``python tests/test_manifests.py --refresh``.
"""
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "stable-diffusion"
DATA = Path(__file__).resolve().parent / "data" / "manifests"
SHARED = REPO.parent / "shared" / "reference" / "manifests"

MANIFESTS = ["v1-inference", "v2-inference", "v2-inference-v"]

# The Intel CPU configs are the v2 configs with these U-Net switches changed; none of them
# touches a key or a shape.
INTEL_UNET_PARAMS = {
    "intel/v2-inference-fp32": {"use_checkpoint": False, "use_fp16": False},
    "intel/v2-inference-bf16": {"use_checkpoint": False, "use_fp16": False, "use_bf16": True},
    "intel/v2-inference-v-fp32": {"use_checkpoint": False, "use_fp16": False},
    "intel/v2-inference-v-bf16": {"use_checkpoint": False, "use_fp16": False, "use_bf16": True},
}
CONFIG_TO_MANIFEST = {name: name for name in MANIFESTS}
CONFIG_TO_MANIFEST.update({name: name.replace("intel/", "").rsplit("-", 1)[0]
                           for name in INTEL_UNET_PARAMS})

SHOW = 15  # keys listed per kind of difference


def compact_manifest(full):
    """The fields of a reference manifest this test needs: key -> shape, and the model config."""
    return {
        "config_file": full["config_file"],
        "reference": full["reference"],
        "model_config": full["model_config"],
        "state_dict": {key: list(shape) for key, shape in full["state_dict"].items()},
    }


def load_manifest(name):
    with open(DATA / f"{name}.json") as f:
        return json.load(f)


def load_config(name):
    return OmegaConf.load(CONFIGS / f"{name}.yaml")


def describe_differences(ours, ref):
    """Readable summary of how two {key: shape} maps differ; empty string when they agree."""
    missing = [k for k in ref if k not in ours]
    unexpected = [k for k in ours if k not in ref]
    mismatched = [f"{k}: ours {ours[k]} vs official {ref[k]}"
                  for k in ref if k in ours and ours[k] != ref[k]]
    lines = []
    for title, items in (("missing (official key we do not have)", missing),
                         ("unexpected (our key the official model does not have)", unexpected),
                         ("shape mismatch", mismatched)):
        if items:
            lines.append(f"{len(items)} {title}:")
            lines += [f"    {item}" for item in items[:SHOW]]
            if len(items) > SHOW:
                lines.append(f"    ... and {len(items) - SHOW} more")
    return "\n".join(lines)


@contextmanager
def parameters_on_meta():
    """Move every parameter to the meta device as it is registered.

    A global ``torch.device("meta")`` would also turn the schedule's numpy round trips into meta
    tensors, which cannot be read back; parameters alone are what costs memory.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_on_meta(config):
    from ldm.util import instantiate_from_config

    with parameters_on_meta():
        return instantiate_from_config(config.model)


@pytest.mark.parametrize("config_name", sorted(CONFIG_TO_MANIFEST))
def test_state_dict_matches_official(config_name):
    manifest = load_manifest(CONFIG_TO_MANIFEST[config_name])
    model = build_on_meta(load_config(config_name))
    state = model.state_dict()
    ours = {key: list(tensor.shape) for key, tensor in state.items()}

    report = describe_differences(ours, manifest["state_dict"])
    assert not report, f"{config_name}.yaml vs {manifest['config_file']}:\n{report}"

    if config_name in MANIFESTS:  # the official model keeps every parameter and buffer in fp32
        not_fp32 = [f"{k}: {t.dtype}" for k, t in state.items() if t.dtype != torch.float32]
        assert not not_fp32, f"{len(not_fp32)} non-fp32 entries, e.g. {not_fp32[:SHOW]}"


@pytest.mark.parametrize("config_name", sorted(CONFIG_TO_MANIFEST))
def test_config_matches_official(config_name):
    """Our YAML's model section is the official one (Intel variants: plus their U-Net switches)."""
    expected = load_manifest(CONFIG_TO_MANIFEST[config_name])["model_config"]
    expected["params"]["unet_config"]["params"].update(INTEL_UNET_PARAMS.get(config_name, {}))
    ours = OmegaConf.to_container(load_config(config_name), resolve=True)
    assert list(ours) == ["model"]
    assert ours["model"] == expected


@pytest.mark.parametrize("name", MANIFESTS)
def test_local_manifest_copy_is_current(name):
    shared = SHARED / f"{name}.json"
    if not shared.exists():
        pytest.skip(f"no shared reference manifests at {SHARED}")
    with open(shared) as f:
        reference = compact_manifest(json.load(f))
    assert load_manifest(name) == reference, (
        f"tests/data/manifests/{name}.json differs from {shared}; "
        "run `python tests/test_manifests.py --refresh`")


def refresh():
    DATA.mkdir(parents=True, exist_ok=True)
    for name in MANIFESTS:
        with open(SHARED / f"{name}.json") as f:
            compact = compact_manifest(json.load(f))
        with open(DATA / f"{name}.json", "w") as f:
            json.dump(compact, f, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {DATA / name}.json ({len(compact['state_dict'])} keys)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--refresh"]:
        sys.exit("usage: python tests/test_manifests.py --refresh")
    refresh()
