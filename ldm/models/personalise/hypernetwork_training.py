"""Hypernetwork training (A1111's "Create hypernetwork" and "Train" tabs): new context MLPs for a frozen model.

The MLPs are the very modules reading an A1111 file builds (:mod:`ldm.modules.hypernetworks.network`), attached
during training through the same hooks as at sampling time (:func:`~ldm.modules.hypernetworks.hypernetwork_use`):
every attention layer computes its keys from ``hyper_k(context)`` and its values from ``hyper_v(context)``, with
the pair of its context width. A1111 trains at multiplier 1 whatever the strength setting says; so does this.

Written into ``<run>/adapters/`` at every checkpoint save and at the end: ``<name>.pt`` in A1111's layout
(:mod:`ldm.modules.hypernetworks.writer`), for ``--hypernetwork FILE[:MULT]``, ``--hypernetwork-dir`` with
``<hypernet:name:mult>``, or A1111's ``models/hypernetworks``.
"""
import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from ldm.errors import UserError
from ldm.models.personalise.adapter_training import AdapterTraining
from ldm.modules.hypernetworks import (
    ACTIVATIONS,
    Hypernetwork,
    HypernetworkModule,
    attention_layers,
    default_dropout_structure,
    hypernetwork_use,
)
from ldm.modules.hypernetworks.writer import save_hypernetwork_file

log = logging.getLogger(__name__)

TRAINING_MULTIPLIER = 1.0  # A1111's HypernetworkModule ignores its multiplier while training
INITIALIZATIONS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
NAME_CHARACTERS = "._- "  # besides letters and digits: what A1111 keeps of a new hypernetwork's name


class HypernetworkTraining(AdapterTraining):
    """A new hypernetwork ``name`` with A1111's options and defaults:

    ``layer_structure``        widths as multiples of the context width, first and last 1 ([1, 2, 1])
    ``activation_func``        after each Linear but the last ("linear": none; names: ``network.ACTIVATIONS``)
    ``weight_initialization``  Normal (std 0.01, zero bias), XavierUniform, XavierNormal, KaimingUniform,
                               KaimingNormal (zero bias); LayerNorms always get Normal, as in A1111
    ``is_layer_norm``          a LayerNorm after each Linear
    ``use_dropout``            dropout with ``dropout_structure`` (a rate after each width, first and last 0),
                               or without it A1111's older rule: 0.3 after each hidden layer but the last, and
                               after the last with ``last_layer_dropout``
    ``activate_output``        the activation after the last Linear too
    ``sizes``                  the context widths to create (default: every width the base model's attention
                               layers read; A1111's default for SD 1.x is 768, 320, 640, 1280)
    ``optional_info``          free text stored in the file

    Other arguments: :class:`AdapterTraining`.
    """

    def __init__(self, name, layer_structure=(1, 2, 1), activation_func="linear", weight_initialization="Normal",
                 is_layer_norm=False, use_dropout=False, dropout_structure=None, activate_output=False,
                 last_layer_dropout=False, sizes=None, optional_info=None, **training):
        options = _checked_options(name, layer_structure, activation_func, weight_initialization, is_layer_norm,
                                   use_dropout, dropout_structure, activate_output, last_layer_dropout, optional_info)
        super().__init__(**training)
        self.options = options
        readable = sorted({width for _, width in attention_layers(self.base)})
        sizes = readable if sizes is None else _checked_sizes(sizes, readable)
        self.layers = nn.ModuleDict({str(width): nn.ModuleList([_new_module(width, options) for _ in "kv"])
                                     for width in sizes})
        self.hypernetwork = Hypernetwork(
            options["name"], {width: tuple(self.layers[str(width)]) for width in sizes}, source=options["name"],
            layer_structure=tuple(options["layer_structure"]), activation=options["activation_func"],
            layer_norm=options["is_layer_norm"], activate_output=options["activate_output"],
            dropout_structure=tuple(options["dropout_structure"]))

    def adapter_parameters(self):
        return list(self.layers.parameters())

    @contextlib.contextmanager
    def attached(self):
        with hypernetwork_use(self.base, [(self.hypernetwork, TRAINING_MULTIPLIER)]):
            yield

    def export(self, directory, step):
        options = self.options
        path = directory / f"{options['name']}.pt"
        save_hypernetwork_file(path, self.hypernetwork.layers, name=options["name"], step=step,
                               layer_structure=options["layer_structure"], activation_func=options["activation_func"],
                               is_layer_norm=options["is_layer_norm"],
                               weight_initialization=options["weight_initialization"], sd_checkpoint=self.base_hash,
                               sd_checkpoint_name=self.base_ckpt.stem, activate_output=options["activate_output"],
                               use_dropout=options["use_dropout"], dropout_structure=options["dropout_structure"],
                               optional_info=options["optional_info"])
        log.info("hypernetwork %r (widths %s, step %d) written to %s", options["name"], self.hypernetwork.dims, step,
                 path)


def _new_module(width, options):
    module = HypernetworkModule(width, options["layer_structure"], options["activation_func"],
                                options["is_layer_norm"], options["activate_output"], options["dropout_structure"])
    _initialise(module, options["weight_initialization"], options["activation_func"])
    return module


@torch.no_grad()
def _initialise(module, weight_initialization, activation_func):
    """A1111's start for a new hypernetwork: its Linears and LayerNorms get ``weight_initialization`` (a LayerNorm
    always Normal, std 0.01, so it starts near zero too) and zero biases; other layers (PReLU) keep torch's."""
    nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
    for layer in module.linear:
        if type(layer) not in (nn.Linear, nn.LayerNorm):
            continue
        if weight_initialization == "Normal" or type(layer) is nn.LayerNorm:
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
        elif weight_initialization == "XavierUniform":
            nn.init.xavier_uniform_(layer.weight)
        elif weight_initialization == "XavierNormal":
            nn.init.xavier_normal_(layer.weight)
        elif weight_initialization == "KaimingUniform":
            nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
        else:
            nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
        nn.init.zeros_(layer.bias)


# ------------------------------------------------------------------ checking the options
def _checked_options(name, layer_structure, activation_func, weight_initialization, is_layer_norm, use_dropout,
                     dropout_structure, activate_output, last_layer_dropout, optional_info):
    if not isinstance(name, str) or not name.strip() or name != name.strip() or \
            not all(c.isalnum() or c in NAME_CHARACTERS for c in name):
        raise UserError(f"name must be letters, digits and '{NAME_CHARACTERS.strip()}' or spaces inside (it names the "
                        f"file and <hypernet:name:...> calls it), got {name!r}")
    structure = _numbers(layer_structure)
    if structure is None or len(structure) < 2 or structure[0] != 1 or structure[-1] != 1 or \
            any(s <= 0 for s in structure):
        raise UserError(f"layer_structure must be widths that start and end with 1, such as [1, 2, 1], got "
                        f"{_shown(layer_structure)}")
    if not isinstance(activation_func, str) or activation_func not in ACTIVATIONS:
        raise UserError(f"activation_func {activation_func!r} is not known; use one of "
                        f"{', '.join(sorted(ACTIVATIONS))}")
    if weight_initialization not in INITIALIZATIONS:
        raise UserError(f"weight_initialization {weight_initialization!r} is not known; use one of "
                        f"{', '.join(INITIALIZATIONS)}")
    flags = {"is_layer_norm": is_layer_norm, "use_dropout": use_dropout, "activate_output": activate_output,
             "last_layer_dropout": last_layer_dropout}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
    if optional_info is not None and not isinstance(optional_info, str):
        raise UserError(f"optional_info must be text, got {optional_info!r}")
    return {"name": name, "layer_structure": [float(s) for s in structure], "activation_func": activation_func,
            "weight_initialization": weight_initialization, **flags, "optional_info": optional_info,
            "dropout_structure": _checked_dropout(dropout_structure, structure, use_dropout, last_layer_dropout)}


def _checked_dropout(dropout_structure, structure, use_dropout, last_layer_dropout):
    """The dropout rate after each width, as A1111 records it: zeros (ints) without dropout, A1111's older rule
    (``default_dropout_structure``) when ``use_dropout`` comes without rates."""
    if dropout_structure is None:
        if not use_dropout:
            return [0] * len(structure)
        return default_dropout_structure(structure, True, last_layer_dropout)
    if not use_dropout:
        raise UserError("dropout_structure is set but use_dropout is false, and A1111 ignores the rates then; set "
                        "use_dropout: true or remove dropout_structure")
    rates = _numbers(dropout_structure)
    if rates is None or len(rates) != len(structure) or rates[0] != 0 or rates[-1] != 0 or \
            any(not 0 <= p < 1 for p in rates):
        raise UserError(f"dropout_structure must give a rate from 0 to below 1 after each of the {len(structure)} "
                        f"widths of layer_structure, first and last 0 (such as [0, 0.1, 0]), got "
                        f"{_shown(dropout_structure)}")
    return [float(p) for p in rates]


def _checked_sizes(sizes, readable):
    values = _numbers(sizes)
    if not values or any(not float(w).is_integer() or w <= 0 for w in values) or len(set(values)) != len(values):
        raise UserError(f"sizes must be distinct context widths, such as {readable}, got {_shown(sizes)}")
    widths = sorted(int(w) for w in values)
    if not set(widths) & set(readable):
        raise UserError(f"no attention layer of the base model reads any of the sizes {widths}; its layers read "
                        f"widths {readable}")
    unused = sorted(set(widths) - set(readable))
    if unused:
        log.warning("no attention layer of the base model reads widths %s (it reads %s): their layers are written "
                    "to the file but never train", unused, readable)
    return widths


def _numbers(value):
    """``value`` as a list when it is a sequence of numbers, else None."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return list(value)


def _shown(value):
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else repr(value)
