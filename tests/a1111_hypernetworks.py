"""A1111 hypernetwork files as A1111 writes them, and what each computes, written from the formula.

A plain module (``tests/`` is on ``sys.path``) shared by the hypernetwork tests. A file is one ``torch.save``d dict:
integer context widths, each a (keys, values) pair of module state dicts (``OrderedDict``, keys
``linear.<Sequential index>.weight``), then A1111's fields. Each layout below lists the state-dict keys and shapes
by hand, in the Sequential indices A1111's HypernetworkModule gives them (Linear, activation, LayerNorm, Dropout
per layer), and the function the MLP computes, so nothing here comes from the code under test.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TINY_WIDTHS = (32, 64)  # the context widths the tiny model's attention layers read


def _linear(sd, g, index, n_in, n_out, std):
    sd[f"linear.{index}.weight"] = torch.randn(n_out, n_in, generator=g) * std
    sd[f"linear.{index}.bias"] = torch.randn(n_out, generator=g) * std
    return lambda x: x @ sd[f"linear.{index}.weight"].T + sd[f"linear.{index}.bias"]


def _layer_norm(sd, g, index, n):
    sd[f"linear.{index}.weight"] = 1 + 0.2 * torch.randn(n, generator=g)
    sd[f"linear.{index}.bias"] = 0.2 * torch.randn(n, generator=g)

    def norm(x):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"linear.{index}.weight"] + sd[f"linear.{index}.bias"]
    return norm


def relu_norm(d, g, std):
    """[1, 2, 1], relu, layer norm, use_dropout + last_layer_dropout (rates [0, 0.3, 0]), no output activation:
    0 Linear, 1 ReLU, 2 LayerNorm, 3 Dropout, 4 Linear, 5 LayerNorm."""
    sd = OrderedDict()
    l0, n2 = _linear(sd, g, 0, d, 2 * d, std), _layer_norm(sd, g, 2, 2 * d)
    l4, n5 = _linear(sd, g, 4, 2 * d, d, std), _layer_norm(sd, g, 5, d)
    return sd, lambda x: n5(l4(n2(torch.relu(l0(x)))))


def deep_mish(d, g, std):
    """[1, 1.5, 2, 1], mish, no layer norm, dropout_structure [0, 0.1, 0.2, 0], output activated:
    0 Linear, 1 Mish, 2 Dropout, 3 Linear, 4 Mish, 5 Dropout, 6 Linear, 7 Mish."""
    sd = OrderedDict()
    l0, l3, l6 = _linear(sd, g, 0, d, d * 3 // 2, std), _linear(sd, g, 3, d * 3 // 2, 2 * d, std), \
        _linear(sd, g, 6, 2 * d, d, std)
    return sd, lambda x: F.mish(l6(F.mish(l3(F.mish(l0(x))))))


def prelu(d, g, std):
    """[1, 2, 1], prelu (a weight of its own), no output activation: 0 Linear, 1 PReLU, 2 Linear."""
    sd = OrderedDict()
    l0 = _linear(sd, g, 0, d, 2 * d, std)
    sd["linear.1.weight"] = torch.tensor([0.1]) + 0.05 * torch.randn(1, generator=g)
    l2 = _linear(sd, g, 2, 2 * d, d, std)

    def slope(x):
        return torch.clamp(x, min=0) + sd["linear.1.weight"] * torch.clamp(x, max=0)
    return sd, lambda x: l2(slope(l0(x)))


def swish(d, g, std):
    """[1, 2, 1], "swish", which A1111 builds as Hardswish: x * relu6(x + 3) / 6; 0 Linear, 1 Hardswish, 2 Linear."""
    sd = OrderedDict()
    l0, l2 = _linear(sd, g, 0, d, 2 * d, std), _linear(sd, g, 2, 2 * d, d, std)
    return sd, lambda x: l2(l0(x) * torch.clamp(l0(x) + 3, 0, 6) / 6)


def novelai(d, g, std):
    """The first files (NovelAI's): two Linears named linear1 / linear2, no fields at all."""
    sd = OrderedDict()
    for name, n_in, n_out in (("linear1", d, 2 * d), ("linear2", 2 * d, d)):
        sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) * std
        sd[f"{name}.bias"] = torch.randn(n_out, generator=g) * std
    return sd, lambda x: (x @ sd["linear1.weight"].T + sd["linear1.bias"]) @ sd["linear2.weight"].T + sd["linear2.bias"]


@dataclass(frozen=True)
class Layout:
    build: object      # (dim, generator, std) -> (state dict, x -> mlp(x))
    fields: dict       # what A1111 writes besides the widths
    pair: type = tuple  # A1111 saves (keys, values) as a tuple; NovelAI's files hold lists
    modules: tuple = ()  # the Sequential's module types, in order


TRAINING = {"step": 4000, "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}
LAYOUTS = {
    "relu_norm": Layout(relu_norm, {
        "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
        "weight_initialization": "Normal", "use_dropout": True, "activate_output": False, "last_layer_dropout": True,
        **TRAINING}, modules=("Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm")),
    "deep_mish": Layout(deep_mish, {
        "layer_structure": [1, 1.5, 2, 1], "activation_func": "mish", "is_layer_norm": False,
        "weight_initialization": "XavierNormal", "activate_output": True, "use_dropout": True,
        "dropout_structure": [0, 0.1, 0.2, 0], "last_layer_dropout": True, "optional_info": None, **TRAINING},
        modules=("Linear", "Mish", "Dropout", "Linear", "Mish", "Dropout", "Linear", "Mish")),
    "prelu": Layout(prelu, {
        "layer_structure": [1, 2, 1], "activation_func": "prelu", "is_layer_norm": False,
        "weight_initialization": "Normal", "use_dropout": False, "activate_output": False, **TRAINING},
        modules=("Linear", "PReLU", "Linear")),
    "swish": Layout(swish, {
        "layer_structure": [1, 2, 1], "activation_func": "swish", "is_layer_norm": False, "use_dropout": False,
        "activate_output": False, **TRAINING}, modules=("Linear", "Hardswish", "Linear")),
    "novelai": Layout(novelai, {}, pair=list, modules=("Linear", "Linear")),
}


def save_a1111_hypernetwork(path, layout="relu_norm", widths=TINY_WIDTHS, seed=0, std=0.3, name="trained-name"):
    """Write a hypernetwork file in ``layout`` for ``widths``; returns ``{width: (keys mlp, values mlp)}``, each
    ``x -> mlp(x)`` (the hypernetwork computes ``x + multiplier * mlp(x)``)."""
    spec = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    data, mlps = {}, {}
    for width in widths:
        (sd_k, mlp_k), (sd_v, mlp_v) = spec.build(width, g, std), spec.build(width, g, std)
        for sd in (sd_k, sd_v):
            sd._metadata = _module_versions(layout, spec)
        data[width] = spec.pair((sd_k, sd_v))
        mlps[width] = (mlp_k, mlp_v)
    if spec.fields:
        data.update(spec.fields, name=name)
    torch.save(data, path)
    return mlps


def _module_versions(layout, spec):
    """The ``_metadata`` that ``Module.state_dict()`` attaches to its OrderedDict (pickled along with it)."""
    names = ["linear1", "linear2"] if layout == "novelai" else \
        ["linear", *(f"linear.{i}" for i in range(len(spec.modules)))]
    return OrderedDict((name, {"version": 1}) for name in ["", *names])
