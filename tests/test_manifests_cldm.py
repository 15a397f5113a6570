"""The ControlNet configs build models whose state dicts match the released ControlNet checkpoints
key for key, ``logvar`` included (same approach as test_manifests.py: full size, parameters on meta).

Refresh the local manifest copies with ``python tests/test_manifests_cldm.py --refresh``.
"""
import pytest
from official_manifests import (
    REPO,
    build_on_meta,
    check_all_fp32,
    check_copy_is_current,
    check_state_dict,
    load_config,
    load_manifest,
    refresh_main,
)
from omegaconf import OmegaConf

CLDM_CONFIGS = REPO / "configs" / "controlnet"
MANIFESTS = ["cldm_v15", "cldm_v21"]
# config -> (manifest, model.params that differ from the manifest's config)
CONFIGS = {
    "cldm_v15": ("cldm_v15", {}),
    "cldm_v21": ("cldm_v21", {}),
    "control_v11e_sd15_shuffle": ("cldm_v15", {"global_average_pooling": True}),
}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_state_dict_matches_official(config_name):
    manifest = load_manifest(CONFIGS[config_name][0])
    state = build_on_meta(load_config(config_name, CLDM_CONFIGS)).state_dict()
    assert list(state["logvar"].shape) == [1000]
    check_state_dict(config_name, manifest, state)
    check_all_fp32(state)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_config_matches_official(config_name):
    manifest, changes = CONFIGS[config_name]
    expected = load_manifest(manifest)["model_config"]
    expected["params"].update(changes)
    ours = OmegaConf.to_container(load_config(config_name, CLDM_CONFIGS), resolve=True)
    assert list(ours) == ["model"]
    assert ours["model"] == expected


@pytest.mark.parametrize("name", MANIFESTS)
def test_local_manifest_copy_is_current(name):
    check_copy_is_current(name, "python tests/test_manifests_cldm.py --refresh")


if __name__ == "__main__":
    refresh_main("test_manifests_cldm.py", MANIFESTS)
