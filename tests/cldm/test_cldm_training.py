"""ControlNet training through main.py: tool_add_control initialisation, the locked U-Net, the hint
batches of ShapesControl, and the control-only export the loaders read back."""
import numpy as np
import pytest
import torch
from tiny_models import (
    build_tiny_model,
    controlnet_config,
    tiny_config,
    write_config,
)

import main as train_main
from cldm.loading import load_controlnet_model
from cldm.training import control_init_state_dict
from ldm.data.shapes import POSITION_PHRASES
from ldm.data.shapes_control import ShapesControl, region_box, region_mask
from ldm.data.shapes_vocabulary import BACKGROUND_RGB
from scripts import export_weights, tool_add_control


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    """A tiny SD checkpoint as the official code saves one ({"state_dict": ...}, no ControlNet) and the
    ControlNet config that fits it."""
    folder = tmp_path_factory.mktemp("base")
    base = build_tiny_model(tiny_config(), seed=3)
    torch.save({"state_dict": base.state_dict()}, folder / "base.ckpt")
    return folder / "base.ckpt", write_config(controlnet_config(), folder / "cldm_tiny.yaml"), base.state_dict()


def test_shapes_control_hint_is_the_region_of_the_shape():
    data = ShapesControl(size=64, hint_size=128, length=40, free_fraction=0.5)
    offsets = []
    for i in range(len(data)):
        attributes, (cx, cy, extent), image, caption = data.example(i)
        item = data[i]
        assert item["hint"].shape == (128, 128, 3) and set(np.unique(item["hint"])) <= {0.0, 1.0}
        assert not any(phrase in caption for phrase in POSITION_PHRASES.values())
        drawn = np.abs(np.asarray(image, np.float32) - BACKGROUND_RGB[attributes["background"]]).sum(-1) > 30
        x0, y0, x1, y1 = region_box(attributes["shape"], cx, cy, extent)
        edge = 1.0 / 64   # antialiased edge pixels reach one pixel beyond the box
        region = region_mask((x0 - edge, y0 - edge, x1 + edge, y1 + edge), 64)
        assert drawn.sum() > 20 and not (drawn & ~region).any()
        hint_region = item["hint"][..., 0] > 0
        assert np.array_equal(hint_region, region_mask(region_box(attributes["shape"], cx, cy, extent), 128))
        offsets.append(min(abs(cx - 0.5), abs(cy - 0.5)))
    # free placement puts some shapes off both axes, which no named position does
    assert max(offsets) > 0.1
    assert np.array_equal(ShapesControl(length=40)[7]["hint"], data[7]["hint"])


def test_control_init_copies_the_encoder_and_keeps_the_zero_convs(base_files):
    _, _, base = base_files
    own = build_tiny_model(controlnet_config(), seed=9).state_dict()
    merged, copied, fresh = control_init_state_dict(base, own)
    assert copied > 0 and fresh > 0
    for key, value in merged.items():
        if key.startswith("control_model."):
            source = "model.diffusion_model." + key[len("control_model."):]
            if source in base:
                assert torch.equal(value, base[source]), key
            else:
                assert key.split(".")[1] in ("input_hint_block", "zero_convs", "middle_block_out"), key
        else:
            assert torch.equal(value, base.get(key, own[key])), key


def test_tool_add_control_writes_a_start_whose_output_is_the_base_models(base_files, tmp_path, capsys):
    base_path, config, base = base_files
    out = tmp_path / "control_ini.ckpt"
    assert tool_add_control.main([str(base_path), str(out), "--config", str(config)]) == 0
    assert "copied from the U-Net" in capsys.readouterr().out
    start = torch.load(out, weights_only=True)["state_dict"]
    assert torch.equal(start["control_model.input_blocks.1.0.in_layers.2.weight"],
                       base["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"])
    assert all(not v.any() for k, v in start.items() if k.startswith("control_model.zero_convs."))
    model = build_tiny_model(controlnet_config())
    model.load_state_dict(start)
    plain = build_tiny_model(tiny_config())
    plain.load_state_dict(base)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    hint = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        controlled = model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]})
        assert torch.equal(controlled, plain.apply_model(x, t, context))
    # refused with one line, the file already written untouched
    before = out.read_bytes()
    assert tool_add_control.main([str(base_path), str(out), "--config", str(config)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    plain_config = write_config(tiny_config(), tmp_path / "plain.yaml")
    assert tool_add_control.main([str(base_path), str(tmp_path / "x.ckpt"), "--config", str(plain_config)]) == 2
    assert "builds no ControlNet" in capsys.readouterr().err
    assert tool_add_control.main([str(out), str(tmp_path / "y.ckpt"), "--config", str(config)]) == 2
    assert "already holds a ControlNet" in capsys.readouterr().err


def training_config(base_path):
    config = controlnet_config(ckpt_path=str(base_path), ucg_training={"txt": {"p": 0.5, "val": ""}})
    config["model"]["base_learning_rate"] = 1.0e-3
    data = {"target": "ldm.data.shapes_control.ShapesControl",
            "params": {"size": 16, "hint_size": 64, "length": 4, "image_key": "jpg", "caption_key": "txt"}}
    config["data"] = {"target": "main.DataModuleFromConfig",
                      "params": {"batch_size": 2, "num_workers": 0, "train": data}}
    config["lightning"] = {"trainer": {"log_every_n_steps": 1, "enable_progress_bar": False,
                                       "enable_model_summary": False},
                           "callbacks": {"image_logger": {"params": {"disabled": True}}}}
    return config


def test_main_trains_only_the_controlnet_and_exports_it(base_files, tmp_path, capsys):
    base_path, cldm_config, base = base_files
    config = write_config(training_config(base_path), tmp_path / "train.yaml")
    args = ["--base", str(config), "-t", "--accelerator", "cpu", "--max_steps", "3", "--logdir", str(tmp_path / "logs"),
            "-n", "control"]
    assert train_main.main(args) == 0
    run = next((tmp_path / "logs").iterdir())
    trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in base.items():     # the locked model: U-Net, autoencoder, text encoder untouched
        assert torch.equal(trained[key], value), key
    zero_convs = [k for k in trained if k.startswith("control_model.zero_convs.") and k.endswith("weight")]
    assert zero_convs and all(trained[k].any() for k in zero_convs)   # they learn from zero

    out = tmp_path / "control.safetensors"
    assert export_weights.main(["--control-only", str(run / "checkpoints" / "last.ckpt"), str(out)]) == 0
    from safetensors.torch import load_file
    exported = load_file(out)
    assert exported and all(k.startswith("control_model.") for k in exported)
    model = load_controlnet_model(base_path, out, cldm_config)
    for key, value in exported.items():
        assert torch.equal(model.state_dict()[key], value)
    capsys.readouterr()


def test_log_images_samples_with_the_hints_and_shows_them(base_files):
    model = build_tiny_model(controlnet_config())
    data = ShapesControl(size=16, hint_size=64, length=2, image_key="jpg", caption_key="txt")
    batch = torch.utils.data.default_collate([data[0], data[1]])
    log = model.log_images(batch, N=2, ddim_steps=2, unconditional_guidance_scale=3.0, inpaint=False,
                           plot_diffusion_rows=False)
    assert log["control"].shape == (2, 3, 64, 64)
    assert log["control"].min() == -1.0 and log["control"].max() == 1.0
    assert log["samples"].shape == (2, 3, 16, 16) and "samples_cfg_scale_3.00" in log
