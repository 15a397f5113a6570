"""Every model family keeps its fixed sub-models frozen through ``model.train()``: eval mode (no
dropout) and no trainable parameters, while the denoiser trains."""
import pytest

from tiny_models import depth_config, inpaint_config, tiny_config, unclip_config, upscale_config

FAMILIES = {
    "txt2img": (tiny_config, ("first_stage_model", "cond_stage_model")),
    "inpaint": (inpaint_config, ("first_stage_model", "cond_stage_model")),
    "depth": (depth_config, ("first_stage_model", "cond_stage_model", "depth_model")),
    "upscale": (upscale_config, ("first_stage_model", "cond_stage_model", "low_scale_model")),
    "unclip": (unclip_config, ("first_stage_model", "cond_stage_model", "embedder", "noise_augmentor")),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_sub_models_stay_frozen_in_training(tiny, family):
    make_config, frozen = FAMILIES[family]
    model = tiny.build(make_config())
    model.train()
    for name in frozen:
        sub = getattr(model, name)
        assert [m for m in sub.modules() if m.training] == [], f"{name} left eval mode"
        assert [n for n, p in sub.named_parameters() if p.requires_grad] == [], f"{name} has trainable weights"
    assert model.model.training and all(p.requires_grad for p in model.model.parameters())


def test_a_trainable_conditioning_encoder_is_not_frozen(tiny):
    model = tiny.build(tiny_config(cond_stage_trainable=True)).train()
    assert model.cond_stage_model.training
    assert all(p.requires_grad for p in model.cond_stage_model.parameters())
    assert not model.first_stage_model.training


def test_unclip_embedder_trains_when_not_frozen(tiny):
    config = unclip_config()
    config["model"]["params"]["freeze_embedder"] = False
    config["model"]["params"]["embedder_config"]["params"]["freeze"] = False
    model = tiny.build(config).train()
    assert all(m.training for m in model.embedder.modules())
    assert all(p.requires_grad for p in model.embedder.parameters())
    assert not model.noise_augmentor.training
