"""Attaching hypernetworks to a model's attention layers, and taking them off again exactly.

As A1111 applies them: every :class:`~ldm.modules.attention.CrossAttention` (self-attention included, whose
context is its own input: hence the 320/640/1280 entries of SD 1.x files) computes its keys from
``hyper_k(context)`` and its values from ``hyper_v(context)``, using the pair of the context's width; several
hypernetworks chain in the order given, each with its multiplier; a layer whose width no hypernetwork has is left
alone. The weights are never touched: each layer gets a ``context_hook``, which is None otherwise, so removing the
hooks gives back the model's computation bit for bit. A multiplier of 0 attaches nothing.
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import UserError
from ldm.modules.hypernetworks.files import Hypernetwork, read_hypernetwork_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HypernetworkUse:
    """One hypernetwork with its multiplier (A1111's ``<hypernet:name:multiplier>``)."""
    hypernetwork: Hypernetwork
    multiplier: float = 1.0


class ContextHook:
    """What a CrossAttention calls on its context: ``context -> (context for keys, context for values)`` through
    ``transforms`` ([(keys module, values module, multiplier)], applied in order). A plain object, not a Module, so
    attaching it adds nothing to the layer's parameters or state dict."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, context):
        keys = values = context
        for hyper_k, hyper_v, multiplier in self.transforms:
            keys = _run(hyper_k, keys, multiplier)
            values = _run(hyper_v, values, multiplier)
        return keys, values


def _run(module, context, multiplier):
    # the hypernetwork keeps its float32 weights; a half-precision context is computed in float32 and cast back
    weight = module.linear[0].weight
    return module(context.to(weight.dtype), multiplier).to(context.dtype)


def attention_layers(model):
    """The CrossAttention layers of ``model`` with the width of the context each one reads."""
    from ldm.modules.attention import CrossAttention
    return [(layer, layer.to_k.in_features) for layer in model.modules() if isinstance(layer, CrossAttention)]


class HypernetworkHooks:
    """Applies sets of hypernetworks to one model: ``apply(uses)``, ``remove()``, or ``with hooks.applied(uses):``.

    ``load(path)`` reads a hypernetwork file (kept, so a file named by many prompts is read once; read again when
    it changed on disk)."""

    def __init__(self, model):
        self.model = model
        self._files = {}     # (resolved path, mtime) -> Hypernetwork
        self._hooked = []    # the layers given a hook
        self.active = ()     # the HypernetworkUse tuple now attached

    def load(self, path, name=None):
        path = Path(path)
        if not path.is_file():
            return read_hypernetwork_file(path, name)  # says what is wrong with the path
        key = (str(path.resolve()), path.stat().st_mtime_ns, name)
        if key not in self._files:
            self._files[key] = read_hypernetwork_file(path, name)
        return self._files[key]

    def apply(self, uses):
        """Attach ``uses`` (HypernetworkUse, or (Hypernetwork, multiplier) tuples), after removing what this object
        attached before. A hypernetwork none of whose widths is the context width of an attention layer of the
        model is refused."""
        uses = tuple(u if isinstance(u, HypernetworkUse) else HypernetworkUse(*u) for u in uses)
        self.remove()
        layers = attention_layers(self.model)
        widths = sorted({width for _, width in layers})
        for use in uses:
            _check_widths(use.hypernetwork, widths)
        if any(getattr(layer, "context_hook", None) is not None for layer, _ in layers):
            raise UserError("this model's attention layers already have hypernetworks attached by another caller; "
                            "remove those first")
        device = next((layer.to_k.weight.device for layer, _ in layers), None)
        for layer, width in layers:
            transforms = [(*use.hypernetwork.layers[width], use.multiplier) for use in uses
                          if use.multiplier != 0 and width in use.hypernetwork.layers]
            if not transforms:
                continue
            for hyper_k, hyper_v, _ in transforms:
                hyper_k.to(device)
                hyper_v.to(device)
            layer.context_hook = ContextHook(transforms)
            self._hooked.append(layer)
        self.active = uses
        if uses:
            log.debug("attached %d hypernetwork(s) to %d of %d attention layers", len(uses), len(self._hooked),
                      len(layers))

    def remove(self):
        """Take every hook this object attached off again."""
        for layer in self._hooked:
            layer.context_hook = None
        self._hooked = []
        self.active = ()

    @contextmanager
    def applied(self, uses):
        """``uses`` attached inside the block, removed after it."""
        self.apply(uses)
        try:
            yield self
        finally:
            self.remove()


@contextmanager
def hypernetwork_use(model, uses):
    """``with hypernetwork_use(model, [(hypernetwork, multiplier), ...]):`` the model runs with them inside the block
    (chained in that order), and exactly as before after it."""
    with HypernetworkHooks(model).applied(uses) as hooks:
        yield hooks


def _check_widths(hypernetwork, widths):
    if not set(hypernetwork.dims) & set(widths):
        raise UserError(f"hypernetwork '{hypernetwork.source}' has layers for context widths "
                        f"{', '.join(map(str, hypernetwork.dims))}, but this model's attention layers read widths "
                        f"{', '.join(map(str, widths)) or 'none'}; it was made for another model")
    unused = sorted(set(hypernetwork.dims) - set(widths))
    if unused:
        log.info("hypernetwork %s: no attention layer of this model reads widths %s; those layers are unused",
                 hypernetwork.name, unused)
