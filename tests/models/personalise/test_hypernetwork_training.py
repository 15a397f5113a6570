"""Hypernetwork training through main.py on the tiny random-weight model: only the hypernetwork's layers train (at
multiplier 1, with gradients through the attention hooks), the base stays bit for bit, the exported file has
A1111's layout and, read back by our reader and applied by our hooks, gives the U-Net the trained computation
(at multiplier 0 the base's exactly), and a resumed run continues where it stopped."""
import hashlib
import logging
from collections import OrderedDict

import pytest
import torch
from a1111_hypernetworks import TINY_WIDTHS
from adapter_runs import adapter_config, train, train_and_resume

from ldm.checkpoint import load_model
from ldm.errors import UserError
from ldm.models.personalise.hypernetwork_training import HypernetworkTraining
from ldm.modules.hypernetworks import (
    attention_layers,
    hypernetwork_use,
    read_hypernetwork_file,
)

NAME = "outline"
# relu, layer norm, dropout [0, 0.1, 0], no output activation: the Sequential A1111 builds for it is
# 0 Linear, 1 ReLU, 2 LayerNorm, 3 Dropout, 4 Linear, 5 LayerNorm
OPTIONS = {"name": NAME, "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
           "use_dropout": True, "dropout_structure": [0, 0.1, 0]}
A1111_MODULE_KEYS = ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias", "linear.4.weight",
                     "linear.4.bias", "linear.5.weight", "linear.5.bias"]
A1111_FIELDS = ["step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                "last_layer_dropout", "optional_info"]


def module_shapes(d):
    return {"linear.0.weight": (2 * d, d), "linear.0.bias": (2 * d,), "linear.2.weight": (2 * d,),
            "linear.2.bias": (2 * d,), "linear.4.weight": (d, 2 * d), "linear.4.bias": (d,), "linear.5.weight": (d,),
            "linear.5.bias": (d,)}


def hypernetwork_config(tiny_files, **params):
    return adapter_config(tiny_files, "ldm.models.personalise.hypernetwork_training.HypernetworkTraining", 1e-3,
                          {"concept": "outline"}, **{**OPTIONS, **params})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, tiny_files):
    """Train 3 steps, keeping the module main.py built and its layers' starting values, then resume to step 5."""
    folder = tmp_path_factory.mktemp("hypernetwork")
    config = tiny.write_config(hypernetwork_config(tiny_files), folder / "tiny-hypernetwork.yaml")
    return train_and_resume(HypernetworkTraining, config, folder / "logs", "hn",
                            on_start=lambda module: {k: v.clone() for k, v in module.layers.state_dict().items()},
                            after_first=lambda run: torch.load(run / "adapters" / f"{NAME}.pt", weights_only=True))


def layer_keys():
    return sorted(f"layers.{d}.{i}.{key}" for d in TINY_WIDTHS for i in (0, 1) for key in A1111_MODULE_KEYS)


def test_checkpoints_hold_only_the_hypernetwork_and_it_trains(trained):
    for ckpt in (trained["first"], trained["resumed"]):
        assert sorted(ckpt["state_dict"]) == layer_keys()
        assert len(ckpt["optimizer_states"][0]["state"]) == len(layer_keys())  # the optimizer holds nothing else
    initial = {f"layers.{k}": v for k, v in trained["initial"].items()}
    for key in layer_keys():
        assert not torch.equal(trained["first"]["state_dict"][key], initial[key]), key
        assert not torch.equal(trained["resumed"]["state_dict"][key], trained["first"]["state_dict"][key]), key


def test_base_weights_are_bit_identical_after_training(trained, tiny_files):
    base = trained["module"].base
    own = base.state_dict()
    assert set(own) == set(tiny_files.state_dict)
    assert all(torch.equal(own[key], value) for key, value in tiny_files.state_dict.items())
    assert not any(p.requires_grad for p in base.parameters())
    assert not base.training
    assert all(layer.context_hook is None for layer, _ in attention_layers(base))  # the hooks came off


def test_resume_continues_the_run(trained):
    assert trained["first"]["global_step"] == 3 and trained["resumed"]["global_step"] == 5
    first_steps = {int(s["step"]) for s in trained["first"]["optimizer_states"][0]["state"].values()}
    resumed_steps = {int(s["step"]) for s in trained["resumed"]["optimizer_states"][0]["state"].values()}
    assert first_steps == {3} and resumed_steps == {5}  # Adam's moments went on, not restarted
    assert trained["first_file"]["step"] == 3


def test_export_has_a1111s_layout(trained, tiny_files):
    data = torch.load(trained["run"] / "adapters" / f"{NAME}.pt", weights_only=True)
    assert list(data) == [*TINY_WIDTHS, *A1111_FIELDS]
    for width in TINY_WIDTHS:
        pair = data[width]
        assert type(pair) is tuple and len(pair) == 2
        for index, state in enumerate(pair):
            assert type(state) is OrderedDict and list(state) == A1111_MODULE_KEYS
            assert {k: tuple(v.shape) for k, v in state.items()} == module_shapes(width)
            assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
            assert "linear.3" in state._metadata  # what Module.state_dict() attaches, Dropout included
            for key, value in state.items():
                assert torch.equal(value, trained["resumed"]["state_dict"][f"layers.{width}.{index}.{key}"])
    assert {k: data[k] for k in A1111_FIELDS} == {
        "step": 5, "name": NAME, "layer_structure": [1.0, 2.0, 1.0], "activation_func": "relu",
        "is_layer_norm": True, "weight_initialization": "Normal",
        "sd_checkpoint": hashlib.sha256(tiny_files.safetensors.read_bytes()).hexdigest()[:10],
        "sd_checkpoint_name": tiny_files.safetensors.stem, "activate_output": False, "use_dropout": True,
        "dropout_structure": [0.0, 0.1, 0.0], "last_layer_dropout": True, "optional_info": None}
    assert type(data["step"]) is int and type(data["last_layer_dropout"]) is bool


def test_export_reads_back_through_our_reader(trained):
    hypernetwork = read_hypernetwork_file(trained["run"] / "adapters" / f"{NAME}.pt")
    assert hypernetwork.name == NAME and hypernetwork.dims == list(TINY_WIDTHS) and hypernetwork.step == 5
    assert hypernetwork.layer_structure == (1.0, 2.0, 1.0) and hypernetwork.activation == "relu"
    assert hypernetwork.layer_norm and not hypernetwork.activate_output
    assert hypernetwork.dropout_structure == (0.0, 0.1, 0.0)
    trained_layers = trained["module"].hypernetwork.layers
    for width in TINY_WIDTHS:
        for loaded, own in zip(hypernetwork.layers[width], trained_layers[width]):
            assert str(loaded) == str(own)  # the very Sequential training used
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), own.state_dict().values()))


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, 32, generator=g)


@torch.no_grad()
def unet_output(model):
    x, t, context = unet_inputs()
    return model.model.diffusion_model(x, t, context=context)


def test_loaded_file_gives_the_trained_unet_output_and_multiplier_0_the_base(trained, tiny_files):
    module = trained["module"].eval()  # dropout off, as at sampling time
    with module.attached():
        in_training = unet_output(module.base)
    model = load_model(tiny_files.config, tiny_files.safetensors, device="cpu")
    base_output = unet_output(model)
    hypernetwork = read_hypernetwork_file(trained["run"] / "adapters" / f"{NAME}.pt")
    with hypernetwork_use(model, [(hypernetwork, 1.0)]):
        assert torch.equal(unet_output(model), in_training)
    with hypernetwork_use(model, [(hypernetwork, 0.0)]):
        assert torch.equal(unet_output(model), base_output)
    assert not torch.equal(in_training, base_output)
    assert torch.equal(unet_output(module.base), base_output)  # detached again


def test_gradients_reach_every_layer_of_the_hypernetwork_and_nothing_else(tiny_files):
    module = HypernetworkTraining(base_config=str(tiny_files.config), base_ckpt=str(tiny_files.safetensors),
                                  **OPTIONS)
    module.train()
    x, t, context = unet_inputs()
    with module.attached():
        module.base.model.diffusion_model(x, t, context=context).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.adapter_parameters())
    assert all(p.grad is None for p in module.base.parameters())


def test_training_runs_at_multiplier_1(tiny_files):
    module = HypernetworkTraining(base_config=str(tiny_files.config), base_ckpt=str(tiny_files.safetensors),
                                  name=NAME).eval()
    with module.attached():
        attached = unet_output(module.base)
    with hypernetwork_use(module.base, [(module.hypernetwork, 1.0)]):
        assert torch.equal(unet_output(module.base), attached)


# ------------------------------------------------------------------ A1111's defaults and initialisations
def build(tiny_files, **options):
    return HypernetworkTraining(base_config=str(tiny_files.config), base_ckpt=str(tiny_files.safetensors),
                                **{"name": NAME, **options})


def test_a1111_defaults(tiny_files, tmp_path):
    module = build(tiny_files)
    assert module.hypernetwork.dims == list(TINY_WIDTHS)  # every width the attention layers read
    for width in TINY_WIDTHS:
        for layer in module.hypernetwork.layers[width]:
            assert [type(m).__name__ for m in layer.linear] == ["Linear", "Linear"]  # linear: no activation
            assert all(m.bias.abs().sum() == 0 for m in layer.linear)
    module.export(tmp_path, 0)
    data = torch.load(tmp_path / f"{NAME}.pt", weights_only=True)
    assert {k: data[k] for k in A1111_FIELDS if k not in ("sd_checkpoint", "sd_checkpoint_name")} == {
        "step": 0, "name": NAME, "layer_structure": [1.0, 2.0, 1.0], "activation_func": "linear",
        "is_layer_norm": False, "weight_initialization": "Normal", "activate_output": False, "use_dropout": False,
        "dropout_structure": [0, 0, 0], "last_layer_dropout": False, "optional_info": None}


def weight_std(module):
    weights = torch.cat([m.linear[0].weight.flatten() for pair in module.hypernetwork.layers.values() for m in pair])
    return weights.std().item()


@pytest.mark.parametrize("initialization, expected_std", [
    ("Normal", lambda fan_in, fan_out: 0.01),
    ("XavierUniform", lambda fan_in, fan_out: (2 / (fan_in + fan_out)) ** 0.5),
    ("XavierNormal", lambda fan_in, fan_out: (2 / (fan_in + fan_out)) ** 0.5),
    ("KaimingUniform", lambda fan_in, fan_out: (2 / fan_in) ** 0.5),
    ("KaimingNormal", lambda fan_in, fan_out: (2 / fan_in) ** 0.5),
])
def test_weight_initialization_as_a1111(tiny_files, initialization, expected_std):
    torch.manual_seed(0)
    module = build(tiny_files, weight_initialization=initialization, is_layer_norm=True, sizes=[64])
    assert weight_std(module) == pytest.approx(expected_std(64, 128), rel=0.05)
    for layer in module.hypernetwork.layers[64]:
        linears_and_norms = [m for m in layer.linear if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
        assert all(m.bias.abs().sum() == 0 for m in linears_and_norms)
        norms = [m.weight for m in layer.linear if isinstance(m, torch.nn.LayerNorm)]
        assert norms and all(w.std().item() < 0.02 for w in norms)  # LayerNorms start near zero, as in A1111


def test_dropout_without_rates_follows_a1111s_older_rule(tiny_files, tmp_path):
    module = build(tiny_files, layer_structure=[1, 2, 2, 1], use_dropout=True, last_layer_dropout=True)
    module.export(tmp_path, 0)
    data = torch.load(tmp_path / f"{NAME}.pt", weights_only=True)
    assert data["dropout_structure"] == [0.0, 0.3, 0.3, 0.0] and data["last_layer_dropout"] is True


def test_sizes_pick_the_widths(tiny_files, caplog):
    assert build(tiny_files, sizes=[32]).hypernetwork.dims == [32]
    with caplog.at_level(logging.WARNING):
        assert build(tiny_files, sizes=[1024, 32]).hypernetwork.dims == [32, 1024]
    assert "never train" in caplog.text


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("options, match", [
    ({"name": ""}, "name must be"),
    ({"name": "a/b"}, "name must be"),
    ({"name": "a:b"}, "name must be"),
    ({"name": "my style-1.0"}, None),
    ({"layer_structure": [2, 1]}, "layer_structure must be"),
    ({"layer_structure": [1, 0, 1]}, "layer_structure must be"),
    ({"layer_structure": "1, 2, 1"}, "layer_structure must be"),
    ({"activation_func": "gelu-ish"}, "activation_func 'gelu-ish' is not known"),
    ({"weight_initialization": "Uniform"}, "weight_initialization 'Uniform' is not known"),
    ({"is_layer_norm": "yes"}, "is_layer_norm must be true or false"),
    ({"dropout_structure": [0, 0.1, 0]}, "use_dropout is false"),
    ({"use_dropout": True, "dropout_structure": [0, 1.5, 0]}, "dropout_structure must give"),
    ({"use_dropout": True, "dropout_structure": [0, 0.1]}, "dropout_structure must give"),
    ({"use_dropout": True, "dropout_structure": [0, 0.1, 0.2]}, "dropout_structure must give"),
    ({"sizes": [1024]}, "no attention layer of the base model reads any of the sizes"),
    ({"sizes": [32, 32]}, "sizes must be distinct"),
    ({"sizes": [32.5]}, "sizes must be distinct"),
])
def test_bad_options_are_refused(tiny_files, options, match):
    if match is None:
        build(tiny_files, **options)
        return
    with pytest.raises(UserError, match=match):
        build(tiny_files, **options)


def test_main_refuses_an_unknown_activation(tmp_path, tiny, tiny_files, capsys):
    config = tiny.write_config(hypernetwork_config(tiny_files, activation_func="gelu-ish"), tmp_path / "bad.yaml")
    assert train(["--base", str(config), "--max_steps", "1", "--logdir", str(tmp_path / "logs")]) == 2
    assert "activation_func 'gelu-ish' is not known" in capsys.readouterr().err
