"""Our configs build models whose state dicts match the official checkpoints key for key.

The spec is the reference manifest of each official config (every state-dict key and shape the
official code produces), read from the repo's copy in tests/data/manifests; see official_manifests.
Models are built full size with every parameter on the meta device: no memory, no weights (buffers
stay real, since the DDPM schedule is computed from numpy at construction).

Refresh the copy with ``python tests/test_manifests.py --refresh``.
"""
import pytest
from omegaconf import OmegaConf

from official_manifests import (build_on_meta, check_all_fp32, check_copy_is_current, check_state_dict, load_config,
                                load_manifest, refresh_main)

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


@pytest.mark.parametrize("config_name", sorted(CONFIG_TO_MANIFEST))
def test_state_dict_matches_official(config_name):
    state = build_on_meta(load_config(config_name)).state_dict()
    check_state_dict(config_name, load_manifest(CONFIG_TO_MANIFEST[config_name]), state)
    if config_name in MANIFESTS:  # the Intel bf16 configs are allowed their bf16
        check_all_fp32(state)


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
    check_copy_is_current(name, "python tests/test_manifests.py --refresh")


if __name__ == "__main__":
    refresh_main("test_manifests.py", MANIFESTS)
