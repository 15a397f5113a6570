"""LoRA training through main.py on the tiny random-weight model: only the LoRA trains, the base stays bit for
bit, the exported file has the keys, shapes and metadata kohya's sd-scripts writes, our --lora loader merges it
into exactly what training saw, and a resumed run continues where it stopped.

The expected layer names below are written from kohya's rule (``networks/lora.py``: the diffusers or Hugging
Face module path behind ``lora_unet_`` / ``lora_te_``, dots made underscores), not from our name tables."""
import hashlib
import json

import pytest
import torch
from adapter_runs import adapter_config, train, train_and_resume
from safetensors import safe_open
from safetensors.torch import save
from tiny_models import build_tiny_model, tiny_config, write_config
from torch.utils.data import default_collate

from ldm.checkpoint import load_model
from ldm.data.prior_preservation import LOSS_WEIGHT_KEY, PriorPreservationDataset, merge_prior_examples
from ldm.data.shapes_concepts import ShapesConcept
from ldm.errors import UserError
from ldm.models.personalise.lora_training import LoraTraining, kohya_targets
from ldm.modules.lora import LoraMerger, lora_use
from ldm.modules.lora.hashes import lora_short_hash

RANK, ALPHA, CONV_RANK, CONV_ALPHA, NAME = 4, 2.0, 2, 1.0, "outline"
CONTEXT, TIME_EMBED = 32, 128  # the tiny U-Net's context_dim and time-embedding width (4 * model_channels)

# the tiny U-Net (model_channels 32, channel_mult [1, 2], one res block per level, attention at both levels) in
# diffusers' block names: transformer blocks with their channels; res blocks with (in, out) channels (up blocks
# take the skip connection's channels too); the down- and upsampler convs with their channels
TRANSFORMERS = {"down_blocks_0_attentions_0": 32, "down_blocks_1_attentions_0": 64, "mid_block_attentions_0": 64,
                "up_blocks_0_attentions_0": 64, "up_blocks_0_attentions_1": 64, "up_blocks_1_attentions_0": 32,
                "up_blocks_1_attentions_1": 32}
RESNETS = {"down_blocks_0_resnets_0": (32, 32), "down_blocks_1_resnets_0": (32, 64), "mid_block_resnets_0": (64, 64),
           "mid_block_resnets_1": (64, 64), "up_blocks_0_resnets_0": (128, 64), "up_blocks_0_resnets_1": (96, 64),
           "up_blocks_1_resnets_0": (96, 32), "up_blocks_1_resnets_1": (64, 32)}
SAMPLERS = {"down_blocks_0_downsamplers_0_conv": 32, "up_blocks_0_upsamplers_0_conv": 64}
TEXT_WIDTH = 32


def linear(out_features, in_features):
    return {"lora_down.weight": (RANK, in_features), "lora_up.weight": (out_features, RANK), "alpha": ALPHA}


def conv(out_channels, in_channels, kernel):
    rank, alpha = (CONV_RANK, CONV_ALPHA) if kernel > 1 else (RANK, ALPHA)
    return {"lora_down.weight": (rank, in_channels, kernel, kernel), "lora_up.weight": (out_channels, rank, 1, 1),
            "alpha": alpha}


def kohya_layers(unet=("transformer",), text_layers=()):
    """``{kohya layer name: {key ending: shape, "alpha": value}}`` as kohya writes them for the tiny model."""
    layers = {}
    if "transformer" in unet:
        for block, c in TRANSFORMERS.items():
            name = f"lora_unet_{block}"
            layers[f"{name}_proj_in"] = layers[f"{name}_proj_out"] = linear(c, c)
            for attn, context in (("attn1", c), ("attn2", CONTEXT)):
                attention = f"{name}_transformer_blocks_0_{attn}"
                layers[f"{attention}_to_q"] = layers[f"{attention}_to_out_0"] = linear(c, c)
                layers[f"{attention}_to_k"] = layers[f"{attention}_to_v"] = linear(c, context)
            layers[f"{name}_transformer_blocks_0_ff_net_0_proj"] = linear(8 * c, c)  # GEGLU: 2 x (4 * c)
            layers[f"{name}_transformer_blocks_0_ff_net_2"] = linear(c, 4 * c)
    if "resnet" in unet:
        for block, (c_in, c_out) in RESNETS.items():
            layers[f"lora_unet_{block}_conv1"] = conv(c_out, c_in, 3)
            layers[f"lora_unet_{block}_conv2"] = conv(c_out, c_out, 3)
            layers[f"lora_unet_{block}_time_emb_proj"] = linear(c_out, TIME_EMBED)
            if c_in != c_out:
                layers[f"lora_unet_{block}_conv_shortcut"] = conv(c_out, c_in, 1)
        for block, c in SAMPLERS.items():
            layers[f"lora_unet_{block}"] = conv(c, c, 3)
    for i in text_layers:
        name = f"lora_te_text_model_encoder_layers_{i}"
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layers[f"{name}_self_attn_{projection}"] = linear(TEXT_WIDTH, TEXT_WIDTH)
        layers[f"{name}_mlp_fc1"] = linear(4 * TEXT_WIDTH, TEXT_WIDTH)
        layers[f"{name}_mlp_fc2"] = linear(TEXT_WIDTH, 4 * TEXT_WIDTH)
    return layers


def lora_config(tiny_files, **params):
    options = {"rank": RANK, "alpha": ALPHA, "targets": ["transformer", "resnet"], "conv_rank": CONV_RANK,
               "conv_alpha": CONV_ALPHA, "train_text_encoder": True, "name": NAME, **params}
    return adapter_config(tiny_files, "ldm.models.personalise.lora_training.LoraTraining", 1e-3,
                          {"concept": "outline"}, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, tiny_files):
    """Train 3 steps (U-Net transformer + res blocks and the text encoder), keeping the module main.py built,
    then resume the run up to step 5."""
    folder = tmp_path_factory.mktemp("lora")
    config = tiny.write_config(lora_config(tiny_files), folder / "tiny-lora.yaml")
    run = train_and_resume(LoraTraining, config, folder / "logs", "lora",
                           after_first=lambda run: (run / "adapters" / f"{NAME}.safetensors").read_bytes())
    return {**run, "file": run["run"] / "adapters" / f"{NAME}.safetensors"}


@torch.no_grad()
def outputs(model, prompt, x, t):
    """(text encoder output, U-Net output) of ``model``."""
    context = model.get_learned_conditioning(prompt)
    return context, model.apply_model(x, t, context)


def read_file(path):
    with safe_open(str(path), "pt") as f:
        keys = f.keys()  # a safetensors file, not a dict
        return {key: f.get_tensor(key) for key in keys}, f.metadata()


# ------------------------------------------------------------------ training
def test_checkpoints_hold_only_the_lora_and_it_trains(trained):
    expected = {f"lora.{name}.{role}" for name, roles in kohya_layers(("transformer", "resnet"), [0]).items()
                for role in roles}
    first, resumed = trained["first"]["state_dict"], trained["resumed"]["state_dict"]
    assert set(first) == set(resumed) == expected
    trainable = [key for key in expected if not key.endswith(".alpha")]
    assert len(trained["resumed"]["optimizer_states"][0]["state"]) == len(trainable)  # nothing else in the optimizer
    for key in trainable:
        assert not torch.equal(first[key], resumed[key]), key  # every down and up weight trained on
    assert all(first[key].abs().sum() > 0 for key in trainable if "lora_up" in key)  # up left its zero start


def test_base_weights_are_bit_identical_after_training(trained, tiny_files):
    base = trained["module"].base
    own = base.state_dict()
    assert set(own) == set(tiny_files.state_dict)
    assert all(torch.equal(own[key], value) for key, value in tiny_files.state_dict.items())
    assert not any(p.requires_grad for p in base.parameters())
    assert not base.training
    assert not any(m._forward_hooks for m in base.modules())  # attached() left nothing behind


def test_resume_continues_the_run(trained):
    assert trained["first"]["global_step"] == 3 and trained["resumed"]["global_step"] == 5
    steps = {int(s["step"]) for s in trained["first"]["optimizer_states"][0]["state"].values()}
    resumed_steps = {int(s["step"]) for s in trained["resumed"]["optimizer_states"][0]["state"].values()}
    assert steps == {3} and resumed_steps == {5}  # Adam's moments went on, not restarted


@torch.no_grad()
def test_training_starts_exactly_at_the_base_model(tiny_files):
    module = LoraTraining(base_config=str(tiny_files.config), base_ckpt=str(tiny_files.safetensors),
                          targets=["transformer", "resnet"], train_text_encoder=True)
    prompt, x, t = ["a red square"], torch.randn(1, 4, 8, 8), torch.tensor([10])
    plain = outputs(module.base, prompt, x, t)
    with module.attached():
        adapted = outputs(module.base, prompt, x, t)
    assert all(torch.equal(a, b) for a, b in zip(plain, adapted))  # up starts at zero


# ------------------------------------------------------------------ the file
def test_file_has_kohyas_keys_and_shapes(trained):
    tensors, _ = read_file(trained["file"])
    expected = kohya_layers(("transformer", "resnet"), [0])
    assert set(tensors) == {f"{name}.{role}" for name, roles in expected.items() for role in roles}
    for name, roles in expected.items():
        assert tuple(tensors[f"{name}.lora_down.weight"].shape) == roles["lora_down.weight"], name
        assert tuple(tensors[f"{name}.lora_up.weight"].shape) == roles["lora_up.weight"], name
        alpha = tensors[f"{name}.alpha"]
        assert alpha.shape == () and float(alpha) == roles["alpha"], name
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    state = trained["resumed"]["state_dict"]
    assert all(torch.equal(tensors[key], state[f"lora.{key}"]) for key in tensors)


def test_metadata_is_kohyas(trained, tiny_files):
    _, meta = read_file(trained["file"])
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == NAME and meta["ss_steps"] == "5"
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert float(meta["ss_learning_rate"]) == pytest.approx(2e-3)  # 1e-3 x batch size 2 (main.py's scale_lr)
    assert meta["ss_num_train_images"] == "4" and meta["ss_resolution"] == "(16, 16)"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_max_train_steps"] == "5"
    base = tiny_files.safetensors.read_bytes()
    assert meta["ss_sd_model_name"] == tiny_files.safetensors.name
    assert meta["ss_sd_model_hash"] == hashlib.sha256(base[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(base).hexdigest()
    tags = json.loads(meta["ss_tag_frequency"])
    assert list(tags) == ["ShapesConcept"] and sum(tags["ShapesConcept"].values()) == 4  # each caption once
    assert json.loads(meta["ss_dataset_dirs"]) == {"ShapesConcept": {"n_repeats": 1, "img_count": 4}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.resolution"] == "16x16" and meta["modelspec.title"] == NAME


def test_hashes_are_the_ones_kohya_precomputes(trained):
    data = trained["file"].read_bytes()
    tensors, meta = read_file(trained["file"])
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header_end:]).hexdigest()  # addnet: bytes after the header
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert lora_short_hash(trained["file"]) == meta["sshs_model_hash"][:12]  # what A1111 writes in Lora hashes


def test_a_kohya_image_folder_is_recorded_as_kohya_records_it(tmp_path, tiny, tiny_files):
    """A ``10_outline`` folder of 2 captioned images, repeated 10 times: kohya's ss_dataset_dirs and per-image
    ss_tag_frequency, whatever the steps trained on."""
    from PIL import Image

    from ldm.data.captioned_folder import write_captioned_image
    folder = tmp_path / "10_outline"
    write_captioned_image(folder, "a", Image.new("RGB", (16, 16), (200, 0, 0)), "outline, a red circle")
    write_captioned_image(folder, "b", Image.new("RGB", (16, 16), (0, 0, 200)), "outline, a blue square")
    config = lora_config(tiny_files, targets=["transformer"], train_text_encoder=False)
    config["data"]["params"]["train"] = {"target": "ldm.data.captioned_folder.CaptionedImageFolder", "params": {
        "folder": str(folder), "size": 16, "repeats": 10, "image_key": "jpg", "caption_key": "txt"}}
    path = tiny.write_config(config, tmp_path / "folder.yaml")
    assert train(["--base", str(path), "--max_steps", "1", "--logdir", str(tmp_path / "logs")]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    _, meta = read_file(run / "adapters" / f"{NAME}.safetensors")
    assert meta["ss_num_train_images"] == "20"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_outline": {"n_repeats": 10, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_outline": {"outline": 2, "a red circle": 1,
                                                                   "a blue square": 1}}
    assert "ss_network_args" not in meta  # no conv layers: kohya writes network args only when given


def test_kohya_regularisation_folders_are_recorded_as_kohya_records_them(tmp_path, tiny, tiny_files):
    """Training images with kohya's ``reg`` folder beside them (prior preservation): the regularisation
    images are counted apart (ss_num_reg_images, ss_reg_dataset_dirs) with their loss weight."""
    from PIL import Image

    from ldm.data.captioned_folder import write_captioned_image
    folders = {"10_outline": ["outline, a red circle", "outline, a blue square"],
               "1_circle": ["a red circle", "a green circle", "a blue circle"]}
    for name, captions in folders.items():
        for i, caption in enumerate(captions):
            write_captioned_image(tmp_path / name, str(i), Image.new("RGB", (16, 16), (40 * i, 0, 0)), caption)
    images = {name: {"target": "ldm.data.captioned_folder.CaptionedImageFolder", "params": {
        "folder": str(tmp_path / name), "size": 16, "repeats": int(name.split("_")[0]), "image_key": "jpg",
        "caption_key": "txt"}} for name in folders}
    config = lora_config(tiny_files, targets=["transformer"], train_text_encoder=False)
    config["data"]["params"]["train"] = {"target": "ldm.data.prior_preservation.PriorPreservationDataset", "params": {
        "instance": images["10_outline"], "prior": images["1_circle"], "prior_loss_weight": 0.5}}
    path = tiny.write_config(config, tmp_path / "reg.yaml")
    assert train(["--base", str(path), "--max_steps", "1", "--logdir", str(tmp_path / "logs")]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    _, meta = read_file(run / "adapters" / f"{NAME}.safetensors")
    assert meta["ss_num_train_images"] == "20" and meta["ss_num_reg_images"] == "3"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_outline": {"n_repeats": 10, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_circle": {"n_repeats": 1, "img_count": 3}}
    assert float(meta["ss_prior_loss_weight"]) == 0.5


def test_regularisation_images_are_weighted_by_the_prior_loss_weight(trained, monkeypatch):
    module = trained["module"]
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # main.py's trainer has finished
    keys = {"size": 16, "image_key": "jpg", "caption_key": "txt"}
    instance, regularisation = ShapesConcept("outline", length=2, **keys), ShapesConcept("colour", length=2, **keys)

    def step_loss(prior_loss_weight):
        data = PriorPreservationDataset(instance, regularisation, prior_loss_weight=prior_loss_weight)
        torch.manual_seed(0)  # the same timesteps and noise for every call
        return module.training_step(default_collate([data[0], data[1]]), 0).item()
    merged = merge_prior_examples(default_collate([PriorPreservationDataset(instance, regularisation)[i]
                                                   for i in range(2)]))
    merged.pop(LOSS_WEIGHT_KEY)
    torch.manual_seed(0)
    with module.attached():
        unweighted = module.base.shared_step(merged)[0].item()
    alone, together, half = step_loss(0.0), step_loss(1.0), step_loss(0.5)
    assert together == unweighted  # weight 1: the base model's loss over all four items
    assert alone != together
    assert half == pytest.approx(alone + 0.5 * (together - alone), rel=1e-6)


def test_every_checkpoint_save_exported_the_file(trained):
    data = trained["first_file"]  # the file as the first run (3 steps) left it
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"]["ss_steps"] == "3"


# ------------------------------------------------------------------ round trip through our loader
@torch.no_grad()
def test_trained_file_merges_into_what_training_saw(trained, tiny_files):
    module = trained["module"]
    prompt, x, t = ["a large red circle on the left"], torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with module.attached():
        in_training = outputs(module.base, prompt, x, t)
    model = load_model(tiny_files.config, tiny_files.safetensors, device="cpu")
    base = outputs(model, prompt, x, t)
    merger = LoraMerger(model)
    lora = merger.load(trained["file"])
    assert not lora.report.unexpected and lora.report.loaded == len(read_file(trained["file"])[0])
    with merger.applied([lora_use(lora, 1.0)]):
        merged = outputs(model, prompt, x, t)
    for got, want in zip(merged, in_training):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with merger.applied([lora_use(lora, 0.0)]):
        at_zero = outputs(model, prompt, x, t)
    assert all(torch.equal(a, b) for a, b in zip(at_zero, base))
    assert not torch.equal(merged[1], base[1])


def randomised(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.lora.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module


@torch.no_grad()
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("fp16", 2e-2)])
def test_any_lora_round_trips_through_our_loader(tmp_path, tiny_files, precision, tolerance):
    """Random (far from zero) LoRA weights on every kind of layer: conv 3x3 and 1x1, linear, fused q/k/v rows."""
    module = randomised(LoraTraining(base_config=str(tiny_files.config), base_ckpt=str(tiny_files.safetensors),
                                     rank=RANK, alpha=ALPHA, targets=["transformer", "resnet"], conv_rank=CONV_RANK,
                                     conv_alpha=CONV_ALPHA, train_text_encoder=True, save_precision=precision))
    module.export(tmp_path, step=0)
    tensors, _ = read_file(tmp_path / "lora.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32 if precision == "fp32" else torch.float16}
    prompt, x, t = ["a small blue square"], torch.randn(1, 4, 8, 8), torch.tensor([300])
    plain = outputs(module.base, prompt, x, t)
    with module.attached():
        adapted = outputs(module.base, prompt, x, t)
    model = load_model(tiny_files.config, tiny_files.safetensors, device="cpu")
    merger = LoraMerger(model)
    with merger.applied([lora_use(merger.load(tmp_path / "lora.safetensors"), 1.0)]):
        merged = outputs(model, prompt, x, t)
    for got, want, before in zip(merged, adapted, plain):
        assert (want - before).abs().max() > 10 * tolerance  # the LoRA changes the outputs well beyond the tolerance
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, prompt, x, t), plain))


# ------------------------------------------------------------------ the SD 1.x and SD 2.x layouts
TINY_OPENCLIP_TEXT = {"embed_dim": TEXT_WIDTH, "text_cfg": {"context_length": 77, "vocab_size": 49408,
                                                            "width": TEXT_WIDTH, "heads": 4, "layers": 2}}
TINY_HF_TEXT = {"hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH, "num_hidden_layers": 2,
                "num_attention_heads": 4, "projection_dim": TEXT_WIDTH}
FAMILIES = {
    # SD 2.x: OpenCLIP read at its "penultimate" layer, linear proj_in / proj_out; kohya's SD 2 text encoder is
    # a 23-layer Hugging Face conversion: the last block, which "penultimate" never runs, is not written
    "sd2": ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
             "params": {"arch": TINY_OPENCLIP_TEXT, "layer": "penultimate"}}, True, [0]),
    # SD 1.x: Hugging Face CLIP, every layer; 1x1 conv proj_in / proj_out
    "sd1": ({"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"text_config": TINY_HF_TEXT}}, False, [0, 1]),
}


def family_files(folder, family):
    from safetensors.torch import save_file
    encoder, linear_transformer, _ = FAMILIES[family]
    config = tiny_config(cond_stage_config=encoder)
    config["model"]["params"]["unet_config"]["params"]["use_linear_in_transformer"] = linear_transformer
    model = build_tiny_model(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{family}.safetensors")
    return write_config(config, folder / f"{family}.yaml"), folder / f"{family}.safetensors", model.state_dict()


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sd_layouts_are_written_as_kohya_names_them(tmp_path, family):
    config, weights, state = family_files(tmp_path, family)
    _, v2, text_layers = FAMILIES[family]
    module = randomised(LoraTraining(base_config=str(config), base_ckpt=str(weights), rank=RANK, alpha=ALPHA,
                                     train_text_encoder=True))
    encoder = module.base.cond_stage_model
    originals = {name: p for name, p in encoder.named_parameters()}
    prompt, x, t = ["a large cyan circle"], torch.randn(1, 4, 8, 8), torch.tensor([10])
    plain = outputs(module.base, prompt, x, t)
    with module.attached():
        adapted = outputs(module.base, prompt, x, t)
    assert all(p is originals[name] for name, p in encoder.named_parameters())  # OpenCLIP's in_proj_weight is back
    assert all(torch.equal(module.base.state_dict()[k], v) for k, v in state.items())

    module.export(tmp_path, step=0)
    tensors, meta = read_file(tmp_path / "lora.safetensors")
    expected = kohya_layers(("transformer",), text_layers)
    if not FAMILIES[family][1]:  # SD 1.x's proj_in / proj_out are 1x1 convs: kohya writes conv LoRA weights
        for name in [n for n in expected if n.endswith(("_proj_in", "_proj_out"))]:
            out_channels = expected[name]["lora_up.weight"][0]
            expected[name] = conv(out_channels, out_channels, 1)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == \
        {f"{name}.{role}": () if role == "alpha" else shape for name, roles in expected.items()
         for role, shape in roles.items()}
    assert meta["ss_v2"] == str(v2) and meta["ss_base_model_version"] == ("sd_v2" if v2 else "sd_v1")
    assert meta["modelspec.architecture"] == ("stable-diffusion-v2-512/lora" if v2 else "stable-diffusion-v1/lora")

    model = load_model(config, weights, device="cpu")
    merger = LoraMerger(model)
    lora = merger.load(tmp_path / "lora.safetensors")
    assert not lora.report.unexpected
    with merger.applied([lora_use(lora, 1.0)]):
        merged = outputs(model, prompt, x, t)
    for got, want, before in zip(merged, adapted, plain):
        assert (want - before).abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, text_layers", [("v1-inference", 12), ("v2-inference-v", 23)])
def test_full_size_sd_gets_the_layers_kohya_creates(config, text_layers):
    """kohya's train_network.py logs "create LoRA for U-Net: 192 modules" for SD 1.x / 2.x (278 with conv_dim,
    LoCon) and 6 text-encoder modules per layer: 72 for SD 1.x, 138 for SD 2.x's 23-layer text encoder."""
    from official_manifests import build_on_meta, load_config
    model = build_on_meta(load_config(config))
    chosen = kohya_targets(model, ("transformer",), unet=True, text_encoder=True)
    unet = [name for name in chosen if name.startswith("lora_unet_")]
    text = [name for name in chosen if name.startswith("lora_te_")]
    assert len(unet) == 192 and len(text) == 6 * text_layers
    assert len(kohya_targets(model, ("transformer", "resnet"))) == 278
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_unet_up_blocks_3_attentions_2_proj_out" in unet
    assert f"lora_te_text_model_encoder_layers_{text_layers - 1}_mlp_fc2" in text
    assert f"lora_te_text_model_encoder_layers_{text_layers}_mlp_fc2" not in text


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("params, match", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"conv_rank": -1}, "conv_rank must be a positive integer"),
    ({"targets": ["attention"]}, "unknown LoRA targets"),
    ({"targets": []}, "train_unet needs targets"),
    ({"train_unet": False, "train_text_encoder": False}, "nothing to train"),
    ({"name": "a/b"}, "name must be a file name"),
    ({"save_precision": "fp8"}, "save_precision must be one of"),
])
def test_bad_parameters_are_refused(tiny_files, params, match):
    with pytest.raises(UserError, match=match):
        LoraTraining(base_config=str(tiny_files.config), base_ckpt=str(tiny_files.safetensors), **params)


def test_main_refuses_a_bad_rank(tmp_path, tiny, tiny_files, capsys):
    config = tiny.write_config(lora_config(tiny_files, rank=0), tmp_path / "bad.yaml")
    assert train(["--base", str(config), "--max_steps", "1", "--logdir", str(tmp_path / "logs")]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err
