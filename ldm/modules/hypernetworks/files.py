"""Reading A1111 hypernetwork files (``.pt``) into :class:`Hypernetwork`\\ s.

A1111's ``Hypernetwork.save`` pickles one plain dict (read here with ``weights_only``: tensors and plain
containers, never code from the file):

=========================  ==================================================================================
``320``, ``640``, ``768``,  one entry per context width it adapts (an ``int`` key): a pair (tuple or list) of
``1024``, ``1280``, ...     module state dicts, for the keys then for the values: ``linear.<index>.weight`` /
                           ``.bias`` as laid out in :mod:`ldm.modules.hypernetworks.network`; the first files
                           (NovelAI's) have ``linear1.*`` / ``linear2.*`` instead, which are ``linear.0`` /
                           ``linear.1``
``layer_structure``        widths as multiples of ``dim``, first and last 1 (missing: ``[1, 2, 1]``)
``activation_func``        activation name or None (missing: None)
``is_layer_norm``          LayerNorm after each Linear (missing: False)
``activate_output``        the activation after the last Linear too (missing: True, as A1111 reads it)
``dropout_structure``      dropout rate after each width; missing: from ``use_dropout`` and
                           ``last_layer_dropout`` (see ``default_dropout_structure``)
``name``, ``step``,        what A1111 records about the training (kept, not used);
``sd_checkpoint``,         ``weight_initialization``, ``optional_info`` likewise
``sd_checkpoint_name``
=========================  ==================================================================================

A hypernetwork is named as A1111 finds it: by its file name without ``.pt`` (the ``name`` inside is only shown).
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.checkpoint import LoadReport, read_torch_file
from ldm.errors import UserError
from ldm.modules.hypernetworks.network import (
    ACTIVATIONS,
    HypernetworkModule,
    default_dropout_structure,
)

log = logging.getLogger(__name__)

HYPERNETWORK_SUFFIX = ".pt"  # A1111 lists only *.pt files as hypernetworks
OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
# what A1111 writes besides the widths (the training records are kept or skipped, never needed)
FIELDS = ("layer_structure", "activation_func", "is_layer_norm", "activate_output", "dropout_structure", "use_dropout",
          "last_layer_dropout", "weight_initialization", "name", "step", "sd_checkpoint", "sd_checkpoint_name",
          "optional_info", "optimizer_name", "optimizer_state_dict")
SHOW = 5  # example keys quoted in errors
LAYOUT = ("an A1111 hypernetwork .pt holds integer context widths (320, 640, 768, 1024, 1280) each with two layer "
          "state dicts, and layer_structure / activation_func fields")


@dataclass
class Hypernetwork:
    """A loaded hypernetwork: ``layers`` maps a context width to its (keys, values) :class:`HypernetworkModule`
    pair (float32, CPU, eval mode); ``name`` is how prompts call it; the structure it was built with and what the
    file records about its training are kept for display. ``report`` counts the tensors loaded."""
    name: str
    layers: dict
    source: str = "hypernetwork"
    layer_structure: tuple = (1, 2, 1)
    activation: object = None
    layer_norm: bool = False
    activate_output: bool = True
    dropout_structure: tuple = ()
    step: object = None
    sd_checkpoint_name: object = None
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def dims(self):
        return sorted(self.layers)


def read_hypernetwork_file(path, name=None):
    """The :class:`Hypernetwork` in the A1111 ``.pt`` file at ``path``, named ``name`` or by its file name."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        raise UserError(f"hypernetwork file '{path}' is a .safetensors file; {LAYOUT} (a torch.save pickle)")
    data = read_torch_file(path, "hypernetwork file")
    return hypernetwork_from_data(data, name or path.stem, source=str(path))


def hypernetwork_from_data(data, name, source="hypernetwork"):
    """``data`` as A1111 saves it (the module docstring's dict) -> :class:`Hypernetwork`; UserError if it is none."""
    widths = [k for k in data if isinstance(k, int) and not isinstance(k, bool)] if isinstance(data, dict) else []
    if not widths:
        raise UserError(f"'{source}' is not a hypernetwork: it holds {_what_it_holds(data)}; {LAYOUT}")
    structure = _layer_structure(data.get("layer_structure", [1, 2, 1]), source)
    activation = data.get("activation_func")
    if activation is not None and (not isinstance(activation, str) or activation not in ACTIVATIONS):
        raise UserError(f"hypernetwork '{source}' uses the activation function {activation!r}, which is not known "
                        f"here; known: {', '.join(sorted(ACTIVATIONS))}")
    options = dict(layer_structure=structure, activation=activation, layer_norm=bool(data.get("is_layer_norm", False)),
                   activate_output=bool(data.get("activate_output", True)),
                   dropout_structure=tuple(_dropout_structure(data, structure, source)))
    layers, loaded = {}, 0
    for width in sorted(widths):
        pair = data[width]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(sd, dict) for sd in pair):
            raise UserError(f"hypernetwork '{source}': context width {width} holds {_what_it_holds(pair)}, not the "
                            f"two layer state dicts (keys, values) of an A1111 hypernetwork; the file is damaged")
        layers[width] = tuple(_module(width, sd, options, f"'{source}', width {width} {part}")
                              for sd, part in zip(pair, ("keys", "values")))
        loaded += sum(len(sd) for sd in pair)
    unknown = sorted(str(k) for k in data if not isinstance(k, int) and k not in FIELDS)
    hypernetwork = Hypernetwork(name, layers, source, **options, step=_plain(data.get("step")),
                                sd_checkpoint_name=_plain(data.get("sd_checkpoint_name")),
                                report=LoadReport(loaded=loaded, ignored=unknown))
    if unknown:
        log.info("hypernetwork %s: fields not used here: %s", source, ", ".join(unknown[:SHOW]))
    log.info("hypernetwork %s: widths %s, layer structure %s, activation %s, layer norm %s", name,
             hypernetwork.dims, list(structure), activation, options["layer_norm"])
    return hypernetwork


def _module(width, state_dict, options, where):
    module = HypernetworkModule(width, **options)
    state = {OLD_KEYS.get(k, k): v for k, v in state_dict.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(v.shape)} (expected {list(expected[k].shape)})" for k, v in state.items()
                  if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} {', '.join(map(str, keys[:SHOW]))}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape:", mismatched)) if keys]
        raise UserError(f"hypernetwork {where} does not fit its own structure (layer_structure "
                        f"{list(options['layer_structure'])}, activation {options['activation']}, layer norm "
                        f"{options['layer_norm']}): {'; '.join(problems)}; the file is damaged or from another tool")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise UserError(f"hypernetwork {where}: {key} holds {_what_it_holds(value)}, not float weights")
        if not torch.isfinite(value).all():
            raise UserError(f"hypernetwork {where}: {key} has NaN or infinite values; the file is corrupt")
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return module.eval().requires_grad_(False)


def _layer_structure(value, source):
    ok = isinstance(value, (list, tuple)) and len(value) >= 2 and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in value)
    if not ok or value[0] != 1 or value[-1] != 1:
        raise UserError(f"hypernetwork '{source}' has layer_structure {value!r}; it must be widths that start and "
                        f"end with 1, such as [1, 2, 1]")
    return tuple(value)


def _dropout_structure(data, structure, source):
    value = data.get("dropout_structure")
    if value is None:
        return default_dropout_structure(structure, bool(data.get("use_dropout", False)),
                                         bool(data.get("last_layer_dropout", False)))
    ok = isinstance(value, (list, tuple)) and len(value) >= len(structure) and all(
        isinstance(p, (int, float)) and 0 <= p < 1 for p in value)
    if not ok:
        raise UserError(f"hypernetwork '{source}' has dropout_structure {value!r}; it must give a rate from 0 to "
                        f"below 1 for each of the {len(structure)} widths of layer_structure {list(structure)}")
    return list(value)


def _plain(value):
    return value if isinstance(value, (str, int)) else None


def _what_it_holds(obj):
    """A few words on what ``obj`` is, naming the other formats a user may have passed by mistake."""
    if isinstance(obj, dict):
        keys = [str(k) for k in obj]
        if "string_to_param" in obj or "emb_params" in obj:
            return "a textual-inversion embedding (string_to_param / emb_params)"
        if "state_dict" in obj or any(k.startswith("model.diffusion_model.") for k in keys):
            return "a model checkpoint (state_dict / model.diffusion_model.*)"
        if any("lora_" in k or "hada_" in k or "lokr_" in k for k in keys):
            return "a LoRA (lora_* / hada_* / lokr_* keys)"
        return f"{len(keys)} entries ({', '.join(keys[:SHOW])})" if keys else "an empty dict"
    kind = type(obj).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def find_hypernetwork_file(name, directory):
    """The file a prompt's ``<hypernet:name:...>`` means: ``name.pt`` in ``directory`` or its subfolders, as A1111
    lists them (``name`` may already end in ``.pt``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"hypernetwork directory '{directory}' does not exist or is not a directory")
    stem = name[:-len(HYPERNETWORK_SUFFIX)] if name.lower().endswith(HYPERNETWORK_SUFFIX) else name
    found = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() == HYPERNETWORK_SUFFIX)
    matches = [p for p in found if p.stem == stem]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"several hypernetworks are named '{stem}' in '{directory}' ({', '.join(map(str, matches))}); "
                        f"keep one or rename the others")
    known = sorted({p.stem for p in found})
    shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
    raise UserError(f"no hypernetwork named '{stem}' in '{directory}' (looked for {stem}{HYPERNETWORK_SUFFIX} there "
                    f"and in its subfolders); hypernetworks there: {shown}")
