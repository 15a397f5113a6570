"""The official state-dict manifests: every key and shape the official code produces for a config,
plus that config's model section.

The reference manifests live in ../shared/reference/manifests beside the repo, which a plain clone
does not have; the parts the tests need are copied into tests/data/manifests. Tests read the copy
(``load_manifest``) and check it is current when the reference is there (``check_copy_is_current``);
``refresh`` rewrites it. Models are built full size with every parameter on the meta device
(``build_on_meta``): no memory, no weights.
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
DATA = REPO / "tests" / "data" / "manifests"
SHARED = REPO.parent / "shared" / "reference" / "manifests"

SHOW = 15  # keys listed per kind of difference


def compact_manifest(full):
    """The fields of a reference manifest the tests need: key -> shape, and the model config."""
    return {
        "config_file": full["config_file"],
        "reference": full["reference"],
        "model_config": full["model_config"],
        "state_dict": {key: list(shape) for key, shape in full["state_dict"].items()},
    }


def load_manifest(name):
    """The repo's copy of manifest ``name`` (e.g. "v2-inference")."""
    with open(DATA / f"{name}.json") as f:
        return json.load(f)


def state_dict_shapes(name, prefix=""):
    """``{key without prefix: shape}`` of manifest ``name``, for the keys that start with ``prefix``."""
    return {key[len(prefix):]: shape for key, shape in load_manifest(name)["state_dict"].items()
            if key.startswith(prefix)}


def load_config(name, folder=CONFIGS):
    return OmegaConf.load(folder / f"{name}.yaml")


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


def check_state_dict(config_name, manifest, state):
    """Fail with a readable report unless ``state``'s keys and shapes are the manifest's."""
    ours = {key: list(tensor.shape) for key, tensor in state.items()}
    report = describe_differences(ours, manifest["state_dict"])
    assert not report, f"{config_name}.yaml vs {manifest['config_file']}:\n{report}"


def check_all_fp32(state):
    """The official models keep every parameter and buffer in fp32."""
    not_fp32 = [f"{k}: {t.dtype}" for k, t in state.items() if t.dtype != torch.float32]
    assert not not_fp32, f"{len(not_fp32)} non-fp32 entries, e.g. {not_fp32[:SHOW]}"


def check_copy_is_current(name, refresh_command):
    """The repo's copy of manifest ``name`` equals the shared reference (skipped where there is none)."""
    shared = SHARED / f"{name}.json"
    if not shared.exists():
        pytest.skip(f"no shared reference manifests at {SHARED}")
    with open(shared) as f:
        reference = compact_manifest(json.load(f))
    assert load_manifest(name) == reference, (
        f"tests/data/manifests/{name}.json differs from {shared}; run `{refresh_command}`")


def refresh(names):
    """Rewrite the repo's copies of manifests ``names`` from the shared reference."""
    DATA.mkdir(parents=True, exist_ok=True)
    for name in names:
        with open(SHARED / f"{name}.json") as f:
            compact = compact_manifest(json.load(f))
        with open(DATA / f"{name}.json", "w") as f:
            json.dump(compact, f, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {DATA / name}.json ({len(compact['state_dict'])} keys)")


def refresh_main(script, names, argv=None):
    """``python tests/<script> --refresh``: refresh ``names``; anything else prints the usage."""
    if (sys.argv[1:] if argv is None else argv) != ["--refresh"]:
        sys.exit(f"usage: python tests/{script} --refresh")
    refresh(names)
