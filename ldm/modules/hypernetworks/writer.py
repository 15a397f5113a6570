"""Writing hypernetworks in A1111's ``.pt`` layout, the dict its ``Hypernetwork.save`` pickles, so that A1111 and
:mod:`ldm.modules.hypernetworks.files` read them.

The dict, in A1111's order: one ``int`` key per context width holding a tuple ``(keys module state dict, values
module state dict)`` (``OrderedDict``\\ s as ``Module.state_dict()`` returns them), then ``step``, ``name``,
``layer_structure``, ``activation_func``, ``is_layer_norm``, ``weight_initialization``, ``sd_checkpoint``,
``sd_checkpoint_name``, ``activate_output``, ``use_dropout``, ``dropout_structure``, ``last_layer_dropout`` (A1111
derives it from the dropout structure: a rate after the last hidden layer) and ``optional_info`` (None when empty).
A1111 keeps the optimizer state in a separate ``<file>.optim``; nothing here writes one.
"""
from collections import OrderedDict

import torch


def hypernetwork_file_data(layers, *, name, step, layer_structure, activation_func, is_layer_norm,
                           weight_initialization, activate_output, use_dropout, dropout_structure,
                           sd_checkpoint=None, sd_checkpoint_name=None, optional_info=None):
    """The dict A1111 saves for ``layers`` (``{width: (keys module, values module)}``, the modules of
    :mod:`ldm.modules.hypernetworks.network`), with float32 CPU copies of their weights."""
    data = {int(width): (_state_dict(pair[0]), _state_dict(pair[1])) for width, pair in layers.items()}
    data.update({
        "step": int(step),
        "name": name,
        "layer_structure": list(layer_structure),
        "activation_func": activation_func,
        "is_layer_norm": bool(is_layer_norm),
        "weight_initialization": weight_initialization,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
        "activate_output": bool(activate_output),
        "use_dropout": bool(use_dropout),
        "dropout_structure": list(dropout_structure),
        "last_layer_dropout": dropout_structure[-2] != 0,
        "optional_info": optional_info or None,
    })
    return data


def save_hypernetwork_file(path, layers, **fields):
    """Write ``layers`` with ``fields`` (see :func:`hypernetwork_file_data`) to ``path`` in A1111's layout."""
    torch.save(hypernetwork_file_data(layers, **fields), path)


def _state_dict(module):
    """``module.state_dict()`` with its tensors as float32 on the CPU, keeping the ``_metadata`` (module versions)
    that the state dict of a saved module carries."""
    state = module.state_dict()
    copy = OrderedDict((key, value.detach().to("cpu", torch.float32)) for key, value in state.items())
    copy._metadata = getattr(state, "_metadata", OrderedDict())
    return copy
