"""Merging LoRAs into tiny models and removing them: the merged weights are W + multiplier * scale * up @ down,
removal restores every weight bit for bit, multiplier 0 changes nothing, a new set replaces the old."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.modules.lora import LoraMerger, LoraUse, lora_use

UNET = "model.diffusion_model."
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PROJ_IN = "lora_unet_down_blocks_1_attentions_1_proj_in"
CONV1 = "lora_unet_up_blocks_1_resnets_2_conv1"
TE_FC1 = "lora_te_text_model_encoder_layers_1_mlp_fc1"


def kohya_file(path, layers, rank=4, alpha=2.0, seed=0):
    """A kohya LoRA file (fp16, 0-d alpha) for ``{name: weight shape}``; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp, *kernel) in layers.items():
        sd[f"{name}.lora_down.weight"] = torch.randn((rank, inp, *kernel), generator=g).half()
        sd[f"{name}.lora_up.weight"] = torch.randn((out, rank, *([1, 1] if kernel else [])), generator=g).half()
        sd[f"{name}.alpha"] = torch.tensor(alpha).half()
    save_file(sd, path)
    return sd


SD1_LAYERS = {Q: (32, 32), PROJ_IN: (64, 64, 1, 1), CONV1: (64, 96, 3, 3), TE_FC1: (64, 32)}
SD1_PARAMS = {Q: UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
              PROJ_IN: UNET + "input_blocks.5.1.proj_in.weight",
              CONV1: UNET + "output_blocks.5.0.in_layers.2.weight",
              TE_FC1: "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"}


def expected_change(sd, name, scale):
    """W's change as kohya's merge_to computes it (linear, 1x1 conv, kxk conv)."""
    up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
    if down.dim() == 2:
        return (up @ down) * scale
    if down.shape[2:] == (1, 1):
        return (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None] * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, state):
    now = model.state_dict()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"


def test_merge_is_w_plus_multiplier_scale_up_down_and_removal_is_exact(tmp_path, sd1_model):
    sd = kohya_file(tmp_path / "a.safetensors", SD1_LAYERS)
    original = snapshot(sd1_model)
    merger = LoraMerger(sd1_model)
    lora = merger.load(tmp_path / "a.safetensors")
    merger.apply([lora_use(lora, 0.7)])
    params = dict(sd1_model.named_parameters())
    for name, param in SD1_PARAMS.items():
        expected = original[param] + 0.7 * expected_change(sd, name, 0.5)
        torch.testing.assert_close(params[param].detach(), expected, rtol=1e-5, atol=1e-6)
    touched = set(SD1_PARAMS.values())
    assert all(torch.equal(v, original[k]) for k, v in sd1_model.state_dict().items() if k not in touched)
    merger.remove()
    assert_state_equal(sd1_model, original)
    assert merger.active == ()


def test_fused_qkv_rows_of_openclip(tmp_path, sd2_model):
    prefix = "lora_te_text_model_encoder_layers_0_self_attn_"
    layers = {prefix + p: (32, 32) for p in ("q_proj", "v_proj")}
    sd = kohya_file(tmp_path / "te.safetensors", layers, rank=2, alpha=4.0)
    param = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    before = dict(sd2_model.named_parameters())[param].detach().clone()
    merger = LoraMerger(sd2_model)
    merger.apply([LoraUse(merger.load(tmp_path / "te.safetensors"), text_encoder=1.0, unet=1.0)])
    after = dict(sd2_model.named_parameters())[param].detach()
    torch.testing.assert_close(after[0:32], before[0:32] + expected_change(sd, prefix + "q_proj", 2.0))
    assert torch.equal(after[32:64], before[32:64])  # k rows untouched
    torch.testing.assert_close(after[64:96], before[64:96] + expected_change(sd, prefix + "v_proj", 2.0))
    merger.remove()
    assert torch.equal(dict(sd2_model.named_parameters())[param], before)


def test_fused_qkv_of_the_shapes_model_text_encoder(tmp_path, shapes_like_model):
    name = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    sd = kohya_file(tmp_path / "k.safetensors", {name: (32, 32)})
    param = "cond_stage_model.blocks.1.attn.qkv.weight"
    before = dict(shapes_like_model.named_parameters())[param].detach().clone()
    merger = LoraMerger(shapes_like_model)
    merger.apply([lora_use(merger.load(tmp_path / "k.safetensors"))])
    after = dict(shapes_like_model.named_parameters())[param].detach()
    torch.testing.assert_close(after[32:64], before[32:64] + expected_change(sd, name, 0.5))
    assert torch.equal(after[:32], before[:32]) and torch.equal(after[64:], before[64:])


def test_multiplier_zero_changes_nothing(tmp_path, sd1_model):
    kohya_file(tmp_path / "a.safetensors", SD1_LAYERS)
    original = snapshot(sd1_model)
    merger = LoraMerger(sd1_model)
    merger.apply([lora_use(merger.load(tmp_path / "a.safetensors"), 0.0)])
    assert_state_equal(sd1_model, original)


def test_text_encoder_and_unet_multipliers_are_separate(tmp_path, sd1_model):
    sd = kohya_file(tmp_path / "a.safetensors", SD1_LAYERS)
    original = snapshot(sd1_model)
    merger = LoraMerger(sd1_model)
    lora = merger.load(tmp_path / "a.safetensors")
    merger.apply([lora_use(lora, 0.0, 1.0)])  # <lora:a:0:1>
    state = sd1_model.state_dict()
    assert torch.equal(state[SD1_PARAMS[TE_FC1]], original[SD1_PARAMS[TE_FC1]])
    assert not torch.equal(state[SD1_PARAMS[Q]], original[SD1_PARAMS[Q]])
    merger.apply([lora_use(lora, 2.0, 0.0)])  # <lora:a:2:0>
    state = sd1_model.state_dict()
    assert torch.equal(state[SD1_PARAMS[Q]], original[SD1_PARAMS[Q]])
    torch.testing.assert_close(state[SD1_PARAMS[TE_FC1]],
                               original[SD1_PARAMS[TE_FC1]] + 2.0 * expected_change(sd, TE_FC1, 0.5))


def test_a_new_set_replaces_the_old_one(tmp_path, sd1_model):
    kohya_file(tmp_path / "a.safetensors", SD1_LAYERS, seed=1)
    kohya_file(tmp_path / "b.safetensors", {Q: (32, 32), CONV1: (64, 96, 3, 3)}, seed=2)
    fresh = copy.deepcopy(sd1_model)
    merger = LoraMerger(sd1_model)
    merger.apply([lora_use(merger.load(tmp_path / "a.safetensors"), 1.0)])
    merger.apply([lora_use(merger.load(tmp_path / "b.safetensors"), 0.5)])
    only_b = LoraMerger(fresh)
    only_b.apply([lora_use(only_b.load(tmp_path / "b.safetensors"), 0.5)])
    assert_state_equal(sd1_model, fresh.state_dict())


def test_two_loras_on_one_weight_add_up(tmp_path, sd1_model):
    a = kohya_file(tmp_path / "a.safetensors", {Q: (32, 32)}, seed=3)
    b = kohya_file(tmp_path / "b.safetensors", {Q: (32, 32)}, rank=2, alpha=1.0, seed=4)
    original = snapshot(sd1_model)
    merger = LoraMerger(sd1_model)
    uses = [lora_use(merger.load(tmp_path / "a.safetensors"), 0.8),
            lora_use(merger.load(tmp_path / "b.safetensors"), -1.5)]
    with merger.applied(uses):
        expected = original[SD1_PARAMS[Q]] + 0.8 * expected_change(a, Q, 0.5) - 1.5 * expected_change(b, Q, 0.5)
        torch.testing.assert_close(sd1_model.state_dict()[SD1_PARAMS[Q]], expected, rtol=1e-5, atol=1e-6)
    assert_state_equal(sd1_model, original)


def test_half_precision_model_sums_in_float32_and_is_restored_bit_for_bit(tmp_path, sd1_model):
    kohya_file(tmp_path / "a.safetensors", SD1_LAYERS, seed=5)
    kohya_file(tmp_path / "b.safetensors", {CONV1: (64, 96, 3, 3)}, seed=6)
    model = sd1_model.half()
    original = snapshot(model)
    merger = LoraMerger(model)
    a, b = merger.load(tmp_path / "a.safetensors"), merger.load(tmp_path / "b.safetensors")
    with merger.applied([lora_use(a, 1.0), lora_use(b, -0.5)]):
        merged = model.state_dict()[SD1_PARAMS[CONV1]]
        # both changes added to the float32 weight, rounded to fp16 once
        changes = [(1.0, d) for d in a.deltas] + [(-0.5, d) for d in b.deltas]
        expected = original[SD1_PARAMS[CONV1]].float()
        for multiplier, delta in changes:
            if delta.target.param == SD1_PARAMS[CONV1]:
                expected += multiplier * delta.delta()
        assert merged.dtype == torch.float16 and torch.equal(merged, expected.half())
        assert not torch.equal(merged, original[SD1_PARAMS[CONV1]])
    assert_state_equal(model, original)


def test_unet_output_changes_and_comes_back(tmp_path, sd1_model):
    kohya_file(tmp_path / "a.safetensors", SD1_LAYERS)
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    unet = sd1_model.model.diffusion_model
    with torch.no_grad():
        base = unet(x, t, context=context)
        merger = LoraMerger(sd1_model)
        merger.apply([lora_use(merger.load(tmp_path / "a.safetensors"), 1.0)])
        assert not torch.allclose(unet(x, t, context=context), base)
        merger.remove()
        assert torch.equal(unet(x, t, context=context), base)


def test_a_lora_read_for_another_model_is_refused(tmp_path, sd1_model, sd2_model):
    kohya_file(tmp_path / "te.safetensors", {TE_FC1: (64, 32)})
    lora = LoraMerger(sd1_model).load(tmp_path / "te.safetensors")
    with pytest.raises(UserError, match="was read for another model"):
        LoraMerger(sd2_model).apply([lora_use(lora)])


def test_load_reads_a_file_once_until_it_changes(tmp_path, sd1_model):
    import os
    kohya_file(tmp_path / "a.safetensors", {Q: (32, 32)}, seed=7)
    merger = LoraMerger(sd1_model)
    first = merger.load(tmp_path / "a.safetensors")
    assert merger.load(tmp_path / "a.safetensors") is first
    sd = kohya_file(tmp_path / "a.safetensors", {Q: (32, 32)}, seed=8)
    os.utime(tmp_path / "a.safetensors", ns=(1, 1))  # a new modification time, whatever the clock's resolution
    again = merger.load(tmp_path / "a.safetensors")
    assert again is not first and torch.equal(again.deltas[0].tensors["up"], sd[f"{Q}.lora_up.weight"])
