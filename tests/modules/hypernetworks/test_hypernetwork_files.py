"""Reading A1111 hypernetwork files: each layout written as A1111 (or NovelAI) writes it, read back and run against
the formula ``x + multiplier * mlp(x)`` written out by hand; files that are no hypernetwork refused by name."""
from collections import OrderedDict

import pytest
import torch
from a1111_hypernetworks import LAYOUTS, TINY_WIDTHS, save_a1111_hypernetwork
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.modules.hypernetworks import (
    default_dropout_structure,
    find_hypernetwork_file,
    read_hypernetwork_file,
)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("multiplier", [1.0, 0.6, -0.5])
def test_each_layout_computes_x_plus_multiplier_times_its_mlp(tmp_path, layout, multiplier):
    mlps = save_a1111_hypernetwork(tmp_path / "style.pt", layout)
    hypernetwork = read_hypernetwork_file(tmp_path / "style.pt")
    assert hypernetwork.dims == list(TINY_WIDTHS)
    g = torch.Generator().manual_seed(1)
    for width in TINY_WIDTHS:
        x = torch.randn(2, 7, width, generator=g)
        for module, mlp in zip(hypernetwork.layers[width], mlps[width]):
            assert tuple(type(m).__name__ for m in module.linear) == LAYOUTS[layout].modules
            with torch.no_grad():
                torch.testing.assert_close(module(x, multiplier), x + multiplier * mlp(x), rtol=1e-5, atol=1e-5)


def test_keys_and_values_have_their_own_weights(tmp_path):
    mlps = save_a1111_hypernetwork(tmp_path / "style.pt")
    hyper_k, hyper_v = read_hypernetwork_file(tmp_path / "style.pt").layers[32]
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert not torch.allclose(hyper_k(x), hyper_v(x))
        torch.testing.assert_close(hyper_v(x), x + mlps[32][1](x), rtol=1e-5, atol=1e-5)


def test_multiplier_zero_gives_the_context_back_exactly(tmp_path):
    save_a1111_hypernetwork(tmp_path / "style.pt")
    hyper_k, _ = read_hypernetwork_file(tmp_path / "style.pt").layers[64]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(hyper_k(x, 0.0), x)


def test_name_fields_and_defaults_as_a1111_reads_them(tmp_path):
    save_a1111_hypernetwork(tmp_path / "style.pt", "relu_norm", name="what-it-was-trained-as")
    new = read_hypernetwork_file(tmp_path / "style.pt")
    assert new.name == "style"  # A1111 finds it by its file name
    assert (new.step, new.sd_checkpoint_name) == (4000, "v1-5-pruned-emaonly")
    assert (new.activation, new.layer_norm, new.activate_output) == ("relu", True, False)
    assert new.dropout_structure == (0.0, 0.3, 0.0)
    assert new.report.loaded == 2 * 2 * 8 and new.report.ignored == []
    save_a1111_hypernetwork(tmp_path / "nai.pt", "novelai")
    old = read_hypernetwork_file(tmp_path / "nai.pt", name="anime")
    assert old.name == "anime" and old.layer_structure == (1, 2, 1) and old.activation is None
    assert old.activate_output and old.step is None


@pytest.mark.parametrize("structure, use_dropout, last, expected", [
    ([1, 2, 1], False, False, [0, 0, 0]),
    ([1, 2, 1], True, False, [0, 0, 0]),
    ([1, 2, 1], True, True, [0, 0.3, 0]),
    ([1, 2, 2, 1], True, False, [0, 0.3, 0, 0]),
    ([1, 2, 2, 1], True, True, [0, 0.3, 0.3, 0]),
    ([1, 2, 4, 2, 1], True, False, [0, 0.3, 0.3, 0, 0]),
])
def test_dropout_rates_of_files_that_store_only_use_dropout(structure, use_dropout, last, expected):
    assert default_dropout_structure(structure, use_dropout, last) == expected


def test_fields_a1111_does_not_write_are_reported(tmp_path):
    save_a1111_hypernetwork(tmp_path / "style.pt")
    data = torch.load(tmp_path / "style.pt", weights_only=True)
    data["made_by"] = "another tool"
    torch.save(data, tmp_path / "extra.pt")
    assert read_hypernetwork_file(tmp_path / "extra.pt").report.ignored == ["made_by"]


# ---------------------------------------------------------------------------------------------- refused
def _write(path, data):
    torch.save(data, path)
    return path


def _a1111_with(tmp_path, changes):
    save_a1111_hypernetwork(tmp_path / "base.pt")
    data = torch.load(tmp_path / "base.pt", weights_only=True)
    data.update(changes)
    return _write(tmp_path / "changed.pt", data)


@pytest.mark.parametrize("data, message", [
    ({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, 768)}}, "textual-inversion embedding"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, "a LoRA"),
    ({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}}, "a model checkpoint"),
    ({"layer_structure": [1, 2, 1], "activation_func": "relu"}, "2 entries (layer_structure, activation_func)"),
    (torch.zeros(3), "holds a Tensor"),
])
def test_a_file_that_is_no_hypernetwork_is_refused_saying_what_it_is(tmp_path, data, message):
    with pytest.raises(UserError, match="is not a hypernetwork") as err:
        read_hypernetwork_file(_write(tmp_path / "x.pt", data))
    assert message in str(err.value) and "integer context widths" in str(err.value)


@pytest.mark.parametrize("activation", ["bogus", "softmax", "glu"])
def test_an_unknown_activation_is_refused_by_name(tmp_path, activation):
    with pytest.raises(UserError, match=f"activation function '{activation}', which is not known here; known: .*mish"):
        read_hypernetwork_file(_a1111_with(tmp_path, {"activation_func": activation}))


def test_weights_that_do_not_fit_the_structure_are_refused(tmp_path):
    # the weights of a relu + layer-norm file, read as if it had no layer norm
    path = _a1111_with(tmp_path, {"is_layer_norm": False})
    with pytest.raises(UserError, match=r"width 32 keys.*missing linear.3.weight.*unexpected linear.2.weight"):
        read_hypernetwork_file(path)


@pytest.mark.parametrize("changes, message", [
    ({"layer_structure": [2, 2, 1]}, "layer_structure [2, 2, 1]; it must be widths that start and end with 1"),
    ({"dropout_structure": [0, 1.5, 0]}, "dropout_structure [0, 1.5, 0]; it must give a rate from 0 to below 1"),
    ({32: (OrderedDict(),)}, "context width 32 holds a tuple"),
])
def test_broken_fields_are_refused(tmp_path, changes, message):
    with pytest.raises(UserError) as err:
        read_hypernetwork_file(_a1111_with(tmp_path, changes))
    assert message in str(err.value)


def test_nan_weights_are_refused(tmp_path):
    save_a1111_hypernetwork(tmp_path / "base.pt")
    data = torch.load(tmp_path / "base.pt", weights_only=True)
    data[64][1]["linear.0.weight"][0, 0] = float("nan")
    with pytest.raises(UserError, match="width 64 values: linear.0.weight has NaN"):
        read_hypernetwork_file(_write(tmp_path / "nan.pt", data))


def test_a_safetensors_file_and_a_missing_file_are_refused(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(UserError, match="is a .safetensors file; an A1111 hypernetwork .pt"):
        read_hypernetwork_file(tmp_path / "h.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        read_hypernetwork_file(tmp_path / "nothere.pt")


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))
    torch.save({320: Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError):
        read_hypernetwork_file(tmp_path / "evil.pt")


# ---------------------------------------------------------------------------------------------- a folder
def test_a_name_is_found_in_the_folder_or_its_subfolders(tmp_path):
    (tmp_path / "styles").mkdir()
    save_a1111_hypernetwork(tmp_path / "styles" / "ink.pt")
    save_a1111_hypernetwork(tmp_path / "other.pt")
    assert find_hypernetwork_file("ink", tmp_path) == tmp_path / "styles" / "ink.pt"
    assert find_hypernetwork_file("other.pt", tmp_path) == tmp_path / "other.pt"
    with pytest.raises(UserError, match=r"no hypernetwork named 'paint' .*hypernetworks there: ink, other"):
        find_hypernetwork_file("paint", tmp_path)
    save_a1111_hypernetwork(tmp_path / "ink.pt")
    with pytest.raises(UserError, match="several hypernetworks are named 'ink'"):
        find_hypernetwork_file("ink", tmp_path)
    with pytest.raises(UserError, match="does not exist or is not a directory"):
        find_hypernetwork_file("ink", tmp_path / "nowhere")
