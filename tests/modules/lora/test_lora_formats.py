"""LoRA files in the layouts the tools write, read for tiny SD-1-like and SD-2-like models.

Each file is built here key by key as its tool saves it (kohya's ``lora_down``/``lora_up``/``alpha`` in
fp16 with a 0-d alpha, PEFT's ``lora_A``/``lora_B`` behind ``unet.``/``text_encoder.``, diffusers'
``lora.down`` and ``lora_linear_layer``, the attention-processor ``.bin`` files, LyCORIS ``hada_*`` and
``lokr_*``); the expected weight changes follow each tool's own formula, written out here.
"""
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.modules.lora import ModuleNames, find_lora_file, load_lora, lora_from_state_dict

UNET = "model.diffusion_model."
HF_TEXT = "cond_stage_model.transformer.text_model.encoder.layers."


def randn(*shape, seed, dtype=torch.float16):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def kohya_layers(layers, rank=4, alpha=2.0, dtype=torch.float16):
    """A kohya LoRA (networks/lora.py) for ``{lora name: weight shape}``: Linear -> lora_down [r, in],
    lora_up [out, r]; Conv2d -> lora_down [r, in, kh, kw] (the layer's kernel), lora_up [out, r, 1, 1];
    alpha a 0-d buffer; everything saved in the save dtype (fp16)."""
    sd = {}
    for i, (name, (out, inp, *kernel)) in enumerate(layers.items()):
        sd[f"{name}.lora_down.weight"] = randn(rank, inp, *kernel, seed=2 * i, dtype=dtype)
        sd[f"{name}.lora_up.weight"] = randn(out, rank, *([1, 1] if kernel else []), seed=2 * i + 1, dtype=dtype)
        sd[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
    return sd


def kohya_delta(up, down, scale):
    """kohya's LoRAModule.merge_to, without the original weight."""
    up, down = up.float(), down.float()
    if down.dim() == 2:
        return (up @ down) * scale
    if down.shape[2:4] == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def by_param(lora):
    return {(d.target.param, d.target.rows): d for d in lora.deltas}


@pytest.fixture
def sd1_names(_sd1):
    return ModuleNames.for_model(_sd1)


@pytest.fixture
def sd2_names(_sd2):
    return ModuleNames.for_model(_sd2)


# kohya name -> (our weight, its shape in the tiny SD-1-like model)
SD1_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        (UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (32, 32)),
    "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k":
        (UNET + "output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight", (32, 32)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
        (UNET + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", (512, 64)),
    "lora_unet_down_blocks_1_attentions_1_proj_in": (UNET + "input_blocks.5.1.proj_in.weight", (64, 64, 1, 1)),
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut":
        (UNET + "input_blocks.4.0.skip_connection.weight", (64, 32, 1, 1)),
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": (UNET + "input_blocks.4.0.emb_layers.1.weight", (64, 128)),
    "lora_unet_up_blocks_1_resnets_2_conv1": (UNET + "output_blocks.5.0.in_layers.2.weight", (64, 96, 3, 3)),
    "lora_unet_down_blocks_0_downsamplers_0_conv": (UNET + "input_blocks.3.0.op.weight", (32, 32, 3, 3)),
    "lora_unet_up_blocks_0_upsamplers_0_conv": (UNET + "output_blocks.2.1.conv.weight", (64, 64, 3, 3)),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (HF_TEXT + "1.self_attn.q_proj.weight", (32, 32)),
    "lora_te_text_model_encoder_layers_2_mlp_fc2": (HF_TEXT + "2.mlp.fc2.weight", (32, 64)),
}


def test_kohya_safetensors(tmp_path, sd1_names, _sd1):
    sd = kohya_layers({name: shape for name, (_, shape) in SD1_KOHYA.items()}, rank=4, alpha=2.0)
    save_file(sd, tmp_path / "style.safetensors", metadata={"ss_network_module": "networks.lora",
                                                           "ss_network_dim": "4", "ss_network_alpha": "2.0"})
    lora = load_lora(tmp_path / "style.safetensors", sd1_names)
    deltas = by_param(lora)
    assert lora.report.loaded == len(sd) and not lora.report.unexpected and lora.kinds == {"lora": len(SD1_KOHYA)}
    own = dict(_sd1.named_parameters())
    for name, (param, shape) in SD1_KOHYA.items():
        delta = deltas[(param, None)]
        assert tuple(own[param].shape) == shape and delta.scale == 0.5  # alpha 2 / rank 4
        expected = kohya_delta(sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"], 0.5)
        torch.testing.assert_close(delta.delta(), expected, rtol=1e-5, atol=1e-5)
        assert delta.target.part == ("text_encoder" if name.startswith("lora_te_") else "unet")


def test_alpha_missing_or_zero_means_scale_one(sd1_names):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = kohya_layers({name: (32, 32)}, rank=4, alpha=0.0)
    assert lora_from_state_dict(sd, sd1_names).deltas[0].scale == 1.0
    del sd[f"{name}.alpha"]
    assert lora_from_state_dict(sd, sd1_names).deltas[0].scale == 1.0
    sd[f"{name}.alpha"] = torch.tensor(8.0, dtype=torch.bfloat16)
    assert lora_from_state_dict(sd, sd1_names).deltas[0].scale == 2.0


def test_sd2_kohya_text_encoder_fills_in_proj_rows(sd2_names):
    layer = "lora_te_text_model_encoder_layers_2_self_attn_"
    sd = kohya_layers({layer + p: (32, 32) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}, rank=2, alpha=1.0)
    deltas = by_param(lora_from_state_dict(sd, sd2_names))
    in_proj = "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"
    for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
        delta = deltas[(in_proj, (32 * i, 32 * (i + 1)))]
        expected = kohya_delta(sd[f"{layer}{p}.lora_up.weight"], sd[f"{layer}{p}.lora_down.weight"], 0.5)
        torch.testing.assert_close(delta.delta(), expected)
    assert ("cond_stage_model.model.transformer.resblocks.2.attn.out_proj.weight", None) in deltas


def test_sd1_conv_proj_lora_fits_sd2_linear_proj(sd2_names):
    """SD 1.x trains proj_in as a 1x1 conv, SD 2.x has a Linear there: the same numbers either way."""
    name = "lora_unet_down_blocks_1_attentions_1_proj_in"
    sd = kohya_layers({name: (64, 64, 1, 1)})
    delta = lora_from_state_dict(sd, sd2_names).deltas[0]
    assert delta.target.param == UNET + "input_blocks.5.1.proj_in.weight" and delta.delta().shape == (64, 64)


# ------------------------------------------------------------------------------------------ diffusers / PEFT
Q1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
OUT1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
TEXT_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def peft_layers(layers, up="lora_B.weight", down="lora_A.weight", rank=4, dtype=torch.float32):
    """PEFT LoRA tensors: lora_A = Linear(in, r) -> [r, in], lora_B = Linear(r, out) -> [out, r]."""
    sd = {}
    for i, (name, (out, inp)) in enumerate(layers.items()):
        sd[f"{name}.{down}"] = randn(rank, inp, seed=10 + 2 * i, dtype=dtype)
        sd[f"{name}.{up}"] = randn(out, rank, seed=11 + 2 * i, dtype=dtype)
    return sd


def test_peft_unet_and_text_encoder_without_alpha(tmp_path, sd1_names):
    sd = peft_layers({f"unet.{Q1}": (32, 32), f"text_encoder.{TEXT_Q}": (32, 32)})
    save_file(sd, tmp_path / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})
    deltas = by_param(load_lora(tmp_path / "pytorch_lora_weights.safetensors", sd1_names))
    q = deltas[(UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None)]
    assert q.scale == 1.0
    torch.testing.assert_close(q.delta(), sd[f"unet.{Q1}.lora_B.weight"] @ sd[f"unet.{Q1}.lora_A.weight"])
    assert (HF_TEXT + "0.self_attn.q_proj.weight", None) in deltas


def test_peft_alpha_from_diffusers_metadata(tmp_path, sd1_names):
    sd = peft_layers({f"unet.{Q1}": (32, 32), f"unet.{K1}": (32, 32), f"text_encoder.{TEXT_Q}": (32, 32)})
    adapter = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {K1: 2}, "unet.use_rslora": False,
               "text_encoder.r": 4, "text_encoder.lora_alpha": 16, "text_encoder.use_rslora": True}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter)}
    save_file(sd, tmp_path / "lora.safetensors", metadata=metadata)
    scales = {d.module: d.scale for d in load_lora(tmp_path / "lora.safetensors", sd1_names).deltas}
    assert scales == {f"unet.{Q1}": 2.0, f"unet.{K1}": 0.5, f"text_encoder.{TEXT_Q}": 8.0}  # 16 / sqrt(4)


def test_peft_adapter_name_and_base_model_prefix(sd1_names):
    sd = peft_layers({f"base_model.model.{Q1}": (32, 32)}, up="lora_B.default.weight", down="lora_A.default.weight")
    assert lora_from_state_dict(sd, sd1_names).deltas[0].target.param == \
        UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


def test_diffusers_lora_down_up_and_lora_linear_layer(sd1_names):
    """convert_state_dict_to_diffusers: U-Net attention .lora.down/.lora.up, text encoder lora_linear_layer."""
    sd = peft_layers({f"unet.{OUT1}": (32, 32)}, up="lora.up.weight", down="lora.down.weight")
    sd.update(peft_layers({f"text_encoder.{TEXT_Q}": (32, 32)}, up="lora_linear_layer.up.weight",
                          down="lora_linear_layer.down.weight"))
    deltas = by_param(lora_from_state_dict(sd, sd1_names))
    out = deltas[(UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight", None)]
    torch.testing.assert_close(out.delta(), sd[f"unet.{OUT1}.lora.up.weight"] @ sd[f"unet.{OUT1}.lora.down.weight"])
    assert (HF_TEXT + "0.self_attn.q_proj.weight", None) in deltas


def test_legacy_attention_processor_bin(tmp_path, sd1_names):
    """LoRAAttnProcessor state dicts (diffusers < 0.21, pytorch_lora_weights.bin): no prefix, one
    to_*_lora pair per projection, to_out_lora for to_out.0; text encoder to_q_lora for q_proj."""
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    sd = {}
    for i, (proj, inp) in enumerate((("to_q", 32), ("to_k", 32), ("to_v", 32), ("to_out", 32))):
        sd[f"{attn}.{proj}_lora.down.weight"] = randn(4, inp, seed=i, dtype=torch.float32)
        sd[f"{attn}.{proj}_lora.up.weight"] = randn(32, 4, seed=20 + i, dtype=torch.float32)
    sd["text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.down.weight"] = randn(4, 32, seed=30)
    sd["text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.up.weight"] = randn(32, 4, seed=31)
    torch.save(sd, tmp_path / "pytorch_lora_weights.bin")
    deltas = by_param(load_lora(tmp_path / "pytorch_lora_weights.bin", sd1_names))
    block = UNET + "input_blocks.1.1.transformer_blocks.0.attn2."
    assert {p for p, _ in deltas} == {block + "to_q.weight", block + "to_k.weight", block + "to_v.weight",
                                      block + "to_out.0.weight", HF_TEXT + "1.self_attn.v_proj.weight"}
    torch.testing.assert_close(deltas[(block + "to_out.0.weight", None)].delta(),
                               sd[f"{attn}.to_out_lora.up.weight"] @ sd[f"{attn}.to_out_lora.down.weight"])


# ----------------------------------------------------------------------------------------------- LyCORIS
def test_loha_linear_and_conv(sd1_names):
    """LyCORIS LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank; a conv's w*_b is [r, in * kh * kw]."""
    layers = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v": (32, 32),
              "lora_unet_up_blocks_1_resnets_2_conv1": (64, 96 * 9)}
    sd = {}
    for i, (name, (out, flat_in)) in enumerate(layers.items()):
        for j, w in enumerate(("w1", "w2")):
            sd[f"{name}.hada_{w}_a"] = randn(out, 4, seed=40 + 4 * i + 2 * j)
            sd[f"{name}.hada_{w}_b"] = randn(4, flat_in, seed=41 + 4 * i + 2 * j)
        sd[f"{name}.alpha"] = torch.tensor(3.0).half()
    deltas = {d.module: d for d in lora_from_state_dict(sd, sd1_names).deltas}
    for name, (out, flat_in) in layers.items():
        f = {k.split(".")[-1]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
        expected = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 0.75
        delta = deltas[name]
        assert delta.kind == "loha" and delta.scale == 0.75
        torch.testing.assert_close(delta.delta(), expected.reshape(delta.shape))
    assert deltas["lora_unet_up_blocks_1_resnets_2_conv1"].delta().shape == (64, 96, 3, 3)


def lycoris_make_kron(w1, w2, scale):
    """LyCORIS functional.lokr.make_kron."""
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous()) * scale


def test_lokr_linear_decomposed_w2(sd1_names):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {f"{name}.lokr_w1": randn(4, 4, seed=50), f"{name}.lokr_w2_a": randn(8, 2, seed=51),
          f"{name}.lokr_w2_b": randn(2, 8, seed=52), f"{name}.alpha": torch.tensor(1.0).half()}
    delta = lora_from_state_dict(sd, sd1_names).deltas[0]
    f = {k.split(".")[-1]: v.float() for k, v in sd.items()}
    assert delta.kind == "lokr" and delta.scale == 0.5
    torch.testing.assert_close(delta.delta(), lycoris_make_kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"], 0.5))


def test_lokr_conv_full_and_decomposed(sd1_names):
    """A 3x3 conv [64, 64, 3, 3] as kron of w1 [8, 8] and w2 [8, 8, 3, 3]: full w2 (no rank, scale 1 whatever
    alpha says), or w2_a [8, r] @ w2_b [r, 8, 3, 3] (LyCORIS's functional layout) with alpha / r."""
    name = "lora_unet_down_blocks_1_resnets_1_conv1"
    w1, w2 = randn(8, 8, seed=60), randn(8, 8, 3, 3, seed=61)
    full = {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(3.0)}
    delta = lora_from_state_dict(full, sd1_names).deltas[0]
    assert delta.target.param == UNET + "input_blocks.5.0.in_layers.2.weight" and delta.scale == 1.0
    torch.testing.assert_close(delta.delta(), lycoris_make_kron(w1.float(), w2.float(), 1.0))

    w2_a, w2_b = randn(8, 2, seed=62), randn(2, 8, 3, 3, seed=63)
    split = {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2_a, f"{name}.lokr_w2_b": w2_b,
             f"{name}.alpha": torch.tensor(3.0)}
    delta = lora_from_state_dict(split, sd1_names).deltas[0]
    w2 = (w2_a.float() @ w2_b.float().view(2, -1)).view(8, 8, 3, 3)
    torch.testing.assert_close(delta.delta(), lycoris_make_kron(w1.float(), w2, 1.5))


# ------------------------------------------------------------------------------------------- what is refused
def test_unknown_keys_are_reported_and_logged(sd1_names, caplog):
    sd = kohya_layers({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
                       "lora_unet_down_blocks_9_attentions_0_proj_in": (32, 32)})
    sd["bundle_emb.cyan.string_to_param.*"] = torch.zeros(1, 32)
    with caplog.at_level(logging.WARNING, logger="ldm.modules.lora.formats"):
        lora = lora_from_state_dict(sd, sd1_names, source="mixed.safetensors")
    assert len(lora.deltas) == 1 and lora.report.loaded == 3
    assert sorted(lora.report.unexpected) == sorted(["bundle_emb.cyan.string_to_param.*",
                                                     "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight",
                                                     "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight",
                                                     "lora_unet_down_blocks_9_attentions_0_proj_in.alpha"])
    assert "4 of 7 keys" in caplog.text and "bundle_emb.cyan" in caplog.text


def test_shape_mismatch_names_layer_and_both_shapes(sd1_names):
    """An SD-2-like cross-attention LoRA (48-wide text) on a model with 32-wide text."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    with pytest.raises(UserError, match=rf"'{name}' changes a \[32, 48\] weight.*attn2.to_k.weight is \[32, 32\]"):
        lora_from_state_dict(kohya_layers({name: (32, 48)}), sd1_names, source="sd2.safetensors")


def test_a_3x3_lora_does_not_fit_a_linear_layer(sd1_names):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(UserError, match=r"\[32, 32, 3, 3\].*\[32, 32\]"):
        lora_from_state_dict(kohya_layers({name: (32, 32, 3, 3)}), sd1_names)
    # nor a linear one a 3x3 conv, even where the flattened sizes agree (32 * 3 * 3 inputs)
    with pytest.raises(UserError, match=r"\[32, 288\].*\[32, 32, 3, 3\]"):
        lora_from_state_dict(kohya_layers({"lora_unet_down_blocks_0_downsamplers_0_conv": (32, 288)}), sd1_names)


@pytest.mark.parametrize("ending, message", [("hada_t1", "Tucker"), ("dora_scale", "DoRA"),
                                             ("lora_mid.weight", "lora_mid"), ("lokr_t2", "Tucker")])
def test_unsupported_kinds_are_refused_by_name(sd1_names, ending, message):
    sd = kohya_layers({"lora_unet_down_blocks_0_resnets_0_conv1": (32, 32, 3, 3)})
    sd[f"lora_unet_down_blocks_0_resnets_0_conv1.{ending}"] = torch.zeros(4, 4, 3, 3)
    with pytest.raises(UserError, match=f"LoRA file 'x.safetensors' uses .*{message}"):
        lora_from_state_dict(sd, sd1_names, source="x.safetensors")


def test_one_layer_in_two_spellings_is_refused(sd1_names):
    sd = peft_layers({f"unet.{Q1}": (32, 32)})
    sd.update(peft_layers({f"unet.{Q1}": (32, 32)}, up="lora.up.weight", down="lora.down.weight"))
    with pytest.raises(UserError, match="two down weights"):
        lora_from_state_dict(sd, sd1_names)
    same_target = peft_layers({f"unet.{Q1}": (32, 32)})
    same_target.update(kohya_layers({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32)}))
    with pytest.raises(UserError, match="attn1.to_q.weight twice"):
        lora_from_state_dict(same_target, sd1_names)


def test_sdxl_files_are_refused(sd1_names):
    sd = kohya_layers({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)})
    with pytest.raises(UserError, match="SDXL"):
        lora_from_state_dict(sd, sd1_names)


def test_incomplete_layer_and_file_of_nothing(sd1_names):
    sd = kohya_layers({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32)})
    del sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"]
    with pytest.raises(UserError, match="lacks its up weight"):
        lora_from_state_dict(sd, sd1_names)
    with pytest.raises(UserError, match="no key of LoRA file 'ckpt.safetensors' names a layer"):
        lora_from_state_dict({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, sd1_names,
                             source="ckpt.safetensors")


def test_unreadable_files(tmp_path, sd1_names):
    with pytest.raises(UserError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", sd1_names)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_lora(tmp_path / "broken.safetensors", sd1_names)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds a list, not named tensors"):
        load_lora(tmp_path / "list.pt", sd1_names)


def test_find_lora_file_by_prompt_name(tmp_path):
    (tmp_path / "outline.safetensors").write_bytes(b"x")
    (tmp_path / "star.pt").write_bytes(b"x")
    assert find_lora_file("outline", tmp_path) == tmp_path / "outline.safetensors"
    assert find_lora_file("star", tmp_path) == tmp_path / "star.pt"
    assert find_lora_file("star.pt", tmp_path) == tmp_path / "star.pt"
    with pytest.raises(UserError, match=r"no LoRA named 'cyan'.*LoRAs there: outline, star"):
        find_lora_file("cyan", tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        find_lora_file("outline", tmp_path / "outline.safetensors")
