"""LoRA layer names -> our parameters: coverage and shapes against the full-size official manifests, and
known pairs of diffusers and ldm block names.

The expected side never comes from ldm.modules.lora: the adapted weights are picked from the manifest by
their own names (every matrix and conv kernel of the U-Net; every matrix of the text encoder's layers),
and each community name's weight shape is worked out here the way diffusers / Hugging Face build their
models (UNet2DConditionModel's block channels, CLIPTextModel's layer widths).
"""
import re

import pytest
from omegaconf import OmegaConf

from ldm.errors import UserError
from ldm.modules.lora.names import ModuleNames, UNetLayout, unet_module_names
from official_manifests import REPO, build_on_meta, load_config, load_manifest

SD_BLOCK_OUT = (320, 640, 1280, 1280)
SD_ATTENTION_BLOCKS = (0, 1, 2)  # CrossAttnDownBlock2D x3, then DownBlock2D


def diffusers_unet_shapes(cross_dim, linear_proj, block_out=SD_BLOCK_OUT, layers=2,
                          attention_blocks=SD_ATTENTION_BLOCKS):
    """``{diffusers module path: weight shape}`` of every linear and conv layer of the SD
    UNet2DConditionModel, with diffusers' own channel bookkeeping (its up blocks take the skip of
    ``reversed_block_out[i + 1]`` in their last resnet)."""
    temb = block_out[0] * 4
    shapes = {"conv_in": (block_out[0], 4, 3, 3), "time_embedding.linear_1": (temb, block_out[0]),
              "time_embedding.linear_2": (temb, temb), "conv_out": (4, block_out[0], 3, 3)}

    def resnet(path, cin, cout):
        shapes.update({f"{path}.conv1": (cout, cin, 3, 3), f"{path}.conv2": (cout, cout, 3, 3),
                       f"{path}.time_emb_proj": (cout, temb)})
        if cin != cout:
            shapes[f"{path}.conv_shortcut"] = (cout, cin, 1, 1)

    def transformer(path, c):
        proj = (c, c) if linear_proj else (c, c, 1, 1)
        shapes.update({f"{path}.proj_in": proj, f"{path}.proj_out": proj})
        block = f"{path}.transformer_blocks.0"
        for attn, kv in (("attn1", c), ("attn2", cross_dim)):
            shapes.update({f"{block}.{attn}.to_q": (c, c), f"{block}.{attn}.to_k": (c, kv),
                           f"{block}.{attn}.to_v": (c, kv), f"{block}.{attn}.to_out.0": (c, c)})
        shapes.update({f"{block}.ff.net.0.proj": (8 * c, c), f"{block}.ff.net.2": (c, 4 * c)})

    n = len(block_out)
    out = block_out[0]
    for i in range(n):
        prev, out = out, block_out[i]
        for j in range(layers):
            resnet(f"down_blocks.{i}.resnets.{j}", prev if j == 0 else out, out)
            if i in attention_blocks:
                transformer(f"down_blocks.{i}.attentions.{j}", out)
        if i < n - 1:
            shapes[f"down_blocks.{i}.downsamplers.0.conv"] = (out, out, 3, 3)
    mid = block_out[-1]
    resnet("mid_block.resnets.0", mid, mid)
    transformer("mid_block.attentions.0", mid)
    resnet("mid_block.resnets.1", mid, mid)
    reversed_out = block_out[::-1]
    prev_output = reversed_out[0]
    for i in range(n):
        out, skip_in = reversed_out[i], reversed_out[min(i + 1, n - 1)]
        for j in range(layers + 1):
            res_skip = skip_in if j == layers else out
            res_in = prev_output if j == 0 else out
            resnet(f"up_blocks.{i}.resnets.{j}", res_in + res_skip, out)
            if n - 1 - i in attention_blocks:
                transformer(f"up_blocks.{i}.attentions.{j}", out)
        if i < n - 1:
            shapes[f"up_blocks.{i}.upsamplers.0.conv"] = (out, out, 3, 3)
        prev_output = out
    return shapes


def clip_text_shapes(width, layers):
    """``{Hugging Face CLIPTextModel module path: weight shape}`` of the layers LoRA trainers adapt."""
    shapes = {}
    for i in range(layers):
        layer = f"text_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{name}"] = (width, width)
        shapes.update({f"{layer}.mlp.fc1": (4 * width, width), f"{layer}.mlp.fc2": (width, 4 * width)})
    return shapes


ADAPTED_UNET = re.compile(r"^model\.diffusion_model\.(.+\.(proj_in|proj_out|to_[qkv]|to_out\.0|ff\.net\.0\.proj|"
                          r"ff\.net\.2|in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)|"
                          r"input_blocks\.0\.0|out\.2|time_embed\.[02])\.weight$")
VERSIONS = {
    # config: (cross-attention width, linear proj_in/out, text width, text layers, text encoder layer prefix)
    "v1-inference": (768, False, 768, 12, "cond_stage_model.transformer.text_model.encoder.layers."),
    # OpenCLIP ViT-H has 24 layers; kohya's SD 2 text encoder drops the last, so its files name 0-22
    "v2-inference": (1024, True, 1024, 24, "cond_stage_model.model.transformer.resblocks."),
}


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def official(request):
    name = request.param
    return name, load_manifest(name)["state_dict"], ModuleNames.for_model(build_on_meta(load_config(name)))


def expected_weights(manifest, text_layers_prefix):
    """Every (weight, rows) of the manifest a LoRA can change: each matrix / conv kernel of the U-Net
    and of the text encoder's layers, a fused in_proj_weight as its three row blocks."""
    unet = {key for key, shape in manifest.items() if key.startswith("model.diffusion_model.") and len(shape) >= 2}
    assert unet == {key for key in manifest if ADAPTED_UNET.match(key)}, "the U-Net has weights of unknown role"
    expected = {(key, None) for key in unet}
    for key, shape in manifest.items():
        if key.startswith(text_layers_prefix) and len(shape) == 2:
            if key.endswith("in_proj_weight"):
                width = shape[0] // 3
                expected |= {(key, (i * width, (i + 1) * width)) for i in range(3)}
            else:
                expected.add((key, None))
    return expected


def test_every_adapted_weight_has_a_community_name_of_its_shape(official):
    name, manifest, names = official
    cross, linear_proj, width, layers, text_prefix = VERSIONS[name]
    community = {("unet", path): shape for path, shape in diffusers_unet_shapes(cross, linear_proj).items()}
    community.update({("text_encoder", path): shape for path, shape in clip_text_shapes(width, layers).items()})
    reached = {}
    for (part, path), shape in community.items():
        kohya = ("lora_unet_" if part == "unet" else "lora_te_") + path.replace(".", "_")
        spellings = (kohya, f"{part}.{path}", path)
        targets = {names.resolve(spelling) for spelling in spellings}
        assert len(targets) == 1 and None not in targets, f"{path}: {targets}"
        target = targets.pop()
        assert target.part == part
        full = manifest[target.param]
        ours = full if target.rows is None else [target.rows[1] - target.rows[0]] + full[1:]
        assert tuple(ours) == shape, f"{path} -> {target.describe()}: manifest {ours}, community {list(shape)}"
        assert tuple(names.shape(target)) == shape
        assert (target.param, target.rows) not in reached, f"{path} and {reached[(target.param, target.rows)]}"
        reached[(target.param, target.rows)] = path
    expected = expected_weights(manifest, text_prefix)
    missing = sorted(f"{k}{r or ''}" for k, r in expected - reached.keys())
    assert not missing, f"{len(missing)} adapted weights without a community name, e.g. {missing[:5]}"
    assert set(reached) == expected


def test_block_arithmetic_from_the_config_names_only_existing_weights():
    for name in VERSIONS:
        manifest = load_manifest(name)
        layout = UNetLayout.from_config(manifest["model_config"]["params"]["unet_config"]["params"])
        names = unet_module_names(layout)
        absent = [ours for ours in names.values()
                  if f"model.diffusion_model.{ours}.weight" not in manifest["state_dict"]]
        assert not absent and len(names) == 282, (name, len(names), absent[:5])  # SD's 282 linear/conv layers


# diffusers block -> ldm block, as the diffusers <-> original SD conversion scripts pair them
KNOWN_SD_PAIRS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_2": "time_embed.2",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.2.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.2.resnets.1.conv1": "input_blocks.8.0.in_layers.2",
    "down_blocks.3.resnets.1.time_emb_proj": "input_blocks.11.0.emb_layers.1",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "middle_block.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.resnets.2.conv_shortcut": "output_blocks.2.0.skip_connection",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0":
        "output_blocks.11.1.transformer_blocks.0.attn1.to_out.0",
    "conv_out": "out.2",
}


def test_known_sd_block_pairs(official):
    _, _, names = official
    for theirs, ours in KNOWN_SD_PAIRS.items():
        assert names.resolve("unet." + theirs).param == f"model.diffusion_model.{ours}.weight", theirs


def test_kohya_names_and_our_own_spelling(official):
    _, _, names = official
    assert names.resolve("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q").param == \
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert names.resolve("lora_unet_mid_block_attentions_0_proj_in").param == \
        "model.diffusion_model.middle_block.1.proj_in.weight"
    assert names.resolve("lora_unet_down_blocks_0_resnets_0_conv1").param == \
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    # SAI-style files spell our own block names
    assert names.resolve("lora_unet_output_blocks_5_2_conv").param == \
        "model.diffusion_model.output_blocks.5.2.conv.weight"
    for unknown in ("lora_unet_down_blocks_3_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0",
                    "lora_te_text_model_encoder_layers_99_mlp_fc1", "unet.text_model.encoder.layers.0.mlp.fc1"):
        assert names.resolve(unknown) is None, unknown


def test_sd2_text_attention_is_three_row_blocks_of_in_proj():
    names = ModuleNames.for_model(build_on_meta(load_config("v2-inference")))
    param = "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        target = names.resolve(f"lora_te_text_model_encoder_layers_22_self_attn_{name}")
        assert (target.param, target.rows) == (param, (1024 * i, 1024 * (i + 1)))
    assert names.resolve("lora_te_text_model_encoder_layers_22_mlp_fc1").param == \
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight"
    assert names.resolve("text_encoder.text_model.encoder.layers.22.self_attn.out_proj").param == \
        "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight"


def test_shipped_shapes_model_layout():
    """3 levels, 1 res block each, attention only at factors 2 and 4: level 0 has no transformer."""
    names = ModuleNames.for_model(build_on_meta(OmegaConf.load(REPO / "models" / "shapes" / "shapes-ldm.yaml")))
    assert names.resolve("lora_unet_down_blocks_0_attentions_0_proj_in") is None
    assert names.resolve("lora_unet_down_blocks_1_attentions_0_proj_in").param == \
        "model.diffusion_model.input_blocks.3.1.proj_in.weight"
    assert names.resolve("lora_unet_up_blocks_0_upsamplers_0_conv").param == \
        "model.diffusion_model.output_blocks.1.2.conv.weight"
    assert names.resolve("lora_unet_up_blocks_1_upsamplers_0_conv").param == \
        "model.diffusion_model.output_blocks.3.2.conv.weight"
    assert names.resolve("lora_te_text_model_encoder_layers_1_self_attn_v_proj").rows == (192, 288)  # v rows of the fused 96-wide qkv
    assert names.resolve("lora_te_text_model_encoder_layers_1_mlp_fc2").param == \
        "cond_stage_model.blocks.1.mlp.2.weight"


def test_unet_without_spatial_transformers_is_refused():
    params = dict(load_manifest("v1-inference")["model_config"]["params"]["unet_config"]["params"])
    params["use_spatial_transformer"] = False
    with pytest.raises(UserError, match="use_spatial_transformer"):
        UNetLayout.from_config(params)
