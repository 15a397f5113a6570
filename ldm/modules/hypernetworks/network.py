"""The network of an A1111 hypernetwork: one small MLP per attention context width, for keys and for values.

Each MLP is ``x + multiplier * linear(x)``, ``linear`` an ``nn.Sequential`` whose indices are the file's keys
(``linear.0.weight``, ...). For ``layer_structure = [1, s_1, ..., 1]`` and context width ``dim``, layer ``i``
(of ``len(layer_structure) - 1``) appends, in this order:

1. ``Linear(dim * s_i, dim * s_(i+1))`` (widths truncated to integers);
2. the activation, unless it is ``linear`` or absent, or this is the last layer and ``activate_output`` is off;
3. ``LayerNorm(dim * s_(i+1))`` when ``is_layer_norm`` (after the last layer too);
4. ``Dropout(p)`` when the dropout structure's entry ``i + 1`` is above 0 (a no-op here, but it takes an index).

Activation names, as A1111 reads them: ``linear`` (none), ``relu``, ``leakyrelu``, ``elu``, ``swish`` (A1111 builds
``Hardswish`` for it, not SiLU), ``tanh``, ``sigmoid``, and torch's elementwise activations by their lower-cased
class names (``mish``, ``softsign``, ``gelu``, ``silu``, ``prelu``, ...).
"""
from torch import nn

# name -> module class; None: no module at all
ACTIVATIONS = {
    "linear": None,
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    # A1111 also takes every class of torch.nn.modules.activation by its lower-cased name; these are the ones
    # that build without arguments and keep the width (softmax & co, GLU, Threshold, MultiheadAttention do not)
    **{cls.__name__.lower(): cls for cls in (
        nn.CELU, nn.GELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.LogSigmoid, nn.Mish,
        nn.PReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.SiLU, nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanhshrink)},
}
DEFAULT_DROPOUT = 0.3  # the rate A1111 uses where a file says only use_dropout


def default_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    """A1111's dropout rates after each width of ``layer_structure`` for files that store only ``use_dropout`` and
    ``last_layer_dropout``: none after the input, 0.3 after each hidden layer but the last, 0.3 after the last
    hidden layer only with ``last_layer_dropout``, none after the output."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    hidden = [DEFAULT_DROPOUT] * (len(layer_structure) - 3)
    return [0.0, *hidden, DEFAULT_DROPOUT if last_layer_dropout else 0.0, 0.0]


class HypernetworkModule(nn.Module):
    """One context transform ``x + multiplier * linear(x)`` of width ``dim`` (see the module docstring)."""

    def __init__(self, dim, layer_structure, activation=None, layer_norm=False, activate_output=False,
                 dropout_structure=None):
        super().__init__()
        last = len(layer_structure) - 2
        layers = []
        for i in range(len(layer_structure) - 1):
            width_in, width_out = int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(width_in, width_out))
            if ACTIVATIONS.get(activation) is not None and (i < last or activate_output):
                layers.append(ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)

    def forward(self, x, multiplier=1.0):
        return x + self.linear(x) * multiplier
