"""Reading LoRA files into per-layer weight changes.

Supported (what each file key ends in, after the layer's name; see :mod:`ldm.modules.lora.names` for
the layer names):

==========================  ==============================================================================
LoRA / LoCon                ``lora_down.weight`` + ``lora_up.weight`` (kohya, LyCORIS LoCon; conv 1x1 and
                            kxk), ``lora_A.weight`` + ``lora_B.weight`` (PEFT, diffusers; also
                            ``lora_A.<adapter>.weight``), ``lora.down/up.weight`` (diffusers),
                            ``lora_linear_layer.down/up.weight`` (diffusers text encoder), legacy
                            attention processors ``<attn>.processor.to_q_lora.down.weight`` ... ``to_out_lora``
LyCORIS LoHa                ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``
LyCORIS LoKr                ``lokr_w1`` or ``lokr_w1_a`` + ``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a`` + ``lokr_w2_b``
all                         optional ``alpha`` (a 0-d tensor)
==========================  ==============================================================================

Weight change at multiplier 1, with ``scale = alpha / rank`` (alpha missing or 0: scale 1, as kohya and
LyCORIS read it):

- LoRA: ``up @ down * scale``; a conv LoRA (up ``[out, r, 1, 1]``, down ``[r, in, kh, kw]``) gives
  ``[out, in, kh, kw]``, the flattened product reshaped (kohya's ``merge_to``). rank = rows of down.
- LoHa (Hadamard product, LyCORIS ``loha``): ``(w1_a @ w1_b) * (w2_a @ w2_b) * scale``, reshaped to
  the weight; rank = rows of ``w1_b``.
- LoKr (Kronecker product, LyCORIS ``lokr``): ``kron(w1, w2) * scale`` with ``w1 = w1_a @ w1_b`` and
  ``w2 = w2_a @ w2_b`` where decomposed; rank = rows of ``w1_b``, else of ``w2_b``; when neither is
  decomposed there is no rank and the scale is 1 whatever alpha says (LyCORIS ignores it there too).

PEFT / diffusers files carry no alpha tensor; newer diffusers keep PEFT's ``lora_alpha`` in the
safetensors metadata (``lora_adapter_metadata``, keys ``unet.lora_alpha`` ...), which is used when
present (with ``alpha_pattern`` and ``use_rslora``: scale = alpha / sqrt(rank)). Without it the scale is 1,
the diffusers convention.

Refused by name (they change the weights in ways this merge does not do): Tucker-decomposed LoHa/LoKr
/LoCon (``hada_t1``, ``lokr_t2``, ``lora_mid``), DoRA (``dora_scale``, ``lora_magnitude_vector``),
LoRA biases, LyCORIS full/OFT/IA3/GLoRA, and SDXL files (``lora_te1_``/``lora_te2_``). Keys that name
no layer of the model are reported (count and examples) and logged, never dropped silently.
"""
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.checkpoint import LoadReport, read_safetensors_file, read_torch_file
from ldm.errors import UserError
from ldm.modules.lora.names import Target

log = logging.getLogger(__name__)

SHOW = 5  # example keys quoted in warnings and errors

# key ending -> (kind, role); the layer's name is what comes before "." + ending
ENDINGS = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "lora.down.weight": ("lora", "down"), "lora.up.weight": ("lora", "up"),
    "lora_linear_layer.down.weight": ("lora", "down"), "lora_linear_layer.up.weight": ("lora", "up"),
    **{f"hada_{w}": ("loha", w) for w in ("w1_a", "w1_b", "w2_a", "w2_b")},
    **{f"lokr_{w}": ("lokr", w) for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")},
    "alpha": (None, "alpha"),
}
ENDINGS_LONGEST_FIRST = sorted(ENDINGS, key=len, reverse=True)
# PEFT state dicts saved without get_peft_model_state_dict keep the adapter's name: lora_A.default.weight
PEFT_NAMED_ADAPTER = re.compile(r"^(.+)\.lora_([AB])\.[^.]+\.weight$")
# diffusers' attention processors before PEFT: <attention>.processor.to_q_lora.down.weight
LEGACY_PROCESSOR = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
LEGACY_UNET_LAYERS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
LEGACY_TEXT_LAYERS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

UNSUPPORTED = {
    "hada_t1": "LyCORIS LoHa with Tucker decomposition (hada_t1/hada_t2)",
    "hada_t2": "LyCORIS LoHa with Tucker decomposition (hada_t1/hada_t2)",
    "lokr_t1": "LyCORIS LoKr with Tucker decomposition (lokr_t2)",
    "lokr_t2": "LyCORIS LoKr with Tucker decomposition (lokr_t2)",
    "lora_mid.weight": "LyCORIS LoCon with Tucker decomposition (lora_mid)",
    "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "lora_B.bias": "LoRA with a bias (lora_B.bias)",
    "diff": "a LyCORIS full weight difference (diff)",
    "diff_b": "a LyCORIS full weight difference (diff_b)",
    "oft_blocks": "LyCORIS OFT (oft_blocks)",
    "oft_diag": "LyCORIS OFT (oft_diag)",
    "on_input": "LyCORIS (IA)^3 (on_input)",
    "a1.weight": "LyCORIS GLoRA (a1/a2/b1/b2)",
}
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
SUPPORTED = ("LoRA/LoCon (kohya lora_down/lora_up, diffusers/PEFT lora_A/lora_B, lora.down/up, "
             "lora_linear_layer, attention processors), LyCORIS LoHa (hada_w*) and LoKr (lokr_w*)")
PEFT_METADATA_KEY = "lora_adapter_metadata"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


# ---------------------------------------------------------------------------------------------- reading
def read_lora_file(path):
    """``(tensors, metadata)`` of a LoRA file on the CPU: safetensors (``metadata`` its header's
    ``__metadata__``), or a ``torch.save`` dict (.pt/.bin/.ckpt) unpickled with ``weights_only`` (never
    code from the file; ``metadata`` empty)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"LoRA file '{path}' does not exist")
    if not path.is_file():
        raise UserError(f"LoRA file '{path}' is not a file; give the path to a .safetensors or .pt LoRA file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        tensors = read_safetensors_file(path, "LoRA file", torch_suffix=".pt")
        with safe_open(str(path), framework="pt") as f:   # readable: load_file has just read it
            metadata = f.metadata() or {}
        return tensors, metadata
    obj = read_torch_file(path, "LoRA file")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"LoRA file '{path}' holds a {type(obj).__name__}, not named tensors; it is no LoRA "
                        f"format read here ({SUPPORTED})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        log.debug("LoRA file %s: skipped %d entries that are not tensors", path, len(obj) - len(tensors))
    return tensors, {}


def find_lora_file(name, directory):
    """The LoRA file a prompt's ``<lora:name:...>`` means: ``name`` plus the first of
    :data:`LORA_SUFFIXES` that exists in ``directory`` (``name`` may already end in one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"LoRA directory '{directory}' does not exist or is not a directory")
    candidates = [directory / name] if Path(name).suffix in LORA_SUFFIXES else \
        [directory / f"{name}{suffix}" for suffix in LORA_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in directory.iterdir() if p.suffix in LORA_SUFFIXES)
    shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
    raise UserError(f"no LoRA named '{name}' in '{directory}' (looked for {', '.join(c.name for c in candidates)}); "
                    f"LoRAs there: {shown}")


# --------------------------------------------------------------------------------------- one layer's change
@dataclass
class ModuleDelta:
    """The change a LoRA file makes to one weight (or block of rows) of the model.

    ``module`` is the layer's name in the file, ``target`` what it resolves to, ``shape`` the shape of
    the weight (rows) it changes, ``kind`` "lora", "loha" or "lokr", ``tensors`` the file's tensors by
    role (``down``, ``up``, ``w1_a``, ...), ``scale`` alpha / rank.
    """
    module: str
    target: Target
    shape: tuple
    kind: str
    tensors: dict
    scale: float
    keys: list = field(default_factory=list)  # the file keys this change was read from

    def delta(self):
        """The weight change at multiplier 1: float32, in ``shape``."""
        t = {role: tensor.float() for role, tensor in self.tensors.items()}
        if self.kind == "lora":
            change = t["up"].flatten(1) @ t["down"].flatten(1)                            # [out, in * kh * kw]
        elif self.kind == "loha":
            change = (t["w1_a"] @ t["w1_b"].flatten(1)) * (t["w2_a"] @ t["w2_b"].flatten(1))
        else:
            w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]                            # [a, b]
            w2 = t["w2"].flatten(1) if "w2" in t else t["w2_a"] @ t["w2_b"].flatten(1)     # [c, d * kh * kw]
            change = torch.kron(w1, w2)                                                    # [a * c, b * d * kh * kw]
        return (change * self.scale).reshape(self.shape)


@dataclass
class LoraFile:
    """A LoRA file read for one model: its weight changes and the report of its keys.

    ``report`` is the loader's :class:`ldm.checkpoint.LoadReport`: ``loaded`` counts the file keys used,
    ``unexpected`` lists the keys that name no layer of the model (not applied).
    """
    source: str
    deltas: list
    report: LoadReport
    kinds: dict  # "lora" / "loha" / "lokr" -> number of layers

    @property
    def parts(self):
        """Which of "unet" and "text_encoder" the file changes."""
        return {d.target.part for d in self.deltas}


def split_key(key, source="LoRA"):
    """``(layer name, kind, role)`` of a file key, or None when its ending is no LoRA weight known here.
    kind is None for ``alpha``. Raises UserError for the endings of formats that are refused."""
    for ending, what in UNSUPPORTED.items():
        if key.endswith("." + ending):
            raise UserError(f"LoRA file '{source}' uses {what}, which is not supported (key '{key}'); "
                            f"supported are {SUPPORTED}")
    legacy = LEGACY_PROCESSOR.match(key)
    if legacy:
        attention, layer, role = legacy.groups()
        layers = LEGACY_TEXT_LAYERS if attention.endswith("self_attn") else LEGACY_UNET_LAYERS
        return f"{attention}.{layers[layer]}", "lora", role
    for ending in ENDINGS_LONGEST_FIRST:
        if key.endswith("." + ending):
            return (key[:-len(ending) - 1],) + ENDINGS[ending]
    named = PEFT_NAMED_ADAPTER.match(key)
    if named:
        return named.group(1), "lora", "down" if named.group(2) == "A" else "up"
    return None


# ------------------------------------------------------------------------------------------- a whole file
def load_lora(path, names):
    """Read the LoRA file at ``path`` for the model whose :class:`~ldm.modules.lora.names.ModuleNames`
    are ``names``; returns a :class:`LoraFile`."""
    tensors, metadata = read_lora_file(path)
    return lora_from_state_dict(tensors, names, source=str(path), metadata=metadata)


def lora_from_state_dict(tensors, names, source="LoRA", metadata=None):
    """The :class:`LoraFile` of a LoRA state dict ``{key: tensor}`` for the model of ``names``.

    Raises UserError for refused formats, SDXL files, incomplete layers, a layer named twice, shapes that
    do not fit the model (naming the layer and both shapes), and files of which no key fits the model.
    """
    if not tensors:
        raise UserError(f"LoRA file '{source}' holds no tensors")
    sdxl = [k for k in tensors if k.startswith(SDXL_PREFIXES)]
    if sdxl:
        raise UserError(f"LoRA file '{source}' is an SDXL LoRA (keys like '{sdxl[0]}'); SDXL is not supported "
                        f"here, only SD 1.x / 2.x LoRAs")
    layers, unknown = {}, []
    for key in tensors:
        parts = split_key(key, source)
        if parts is None:
            unknown.append(key)
            continue
        layer, kind, role = parts
        roles = layers.setdefault(layer, {})
        if role in roles:
            raise UserError(f"LoRA file '{source}' has two {role} weights for layer '{layer}' ('{roles[role][0]}' "
                            f"and '{key}')")
        roles[role] = (key, kind)

    peft_alphas = _peft_alphas(metadata or {}, source)
    deltas, unmapped, kinds, seen = [], list(unknown), {}, {}
    for layer, roles in layers.items():
        target = names.resolve(layer)
        keys = [key for key, _ in roles.values()]
        if target is None:
            unmapped.extend(keys)
            continue
        if target in seen:
            raise UserError(f"LoRA file '{source}' changes {target.describe()} twice ('{seen[target]}' and "
                            f"'{layer}')")
        seen[target] = layer
        delta = _module_delta(layer, target, roles, tensors, names, source, peft_alphas)
        deltas.append(delta)
        kinds[delta.kind] = kinds.get(delta.kind, 0) + 1

    report = LoadReport(loaded=sum(len(d.keys) for d in deltas), unexpected=unmapped)
    if not deltas:
        note = f"; {names.text_encoder_note}" if names.text_encoder_note else ""
        raise UserError(f"no key of LoRA file '{source}' names a layer of this model ({len(tensors)} keys such as "
                        f"'{next(iter(tensors))}'){note}; supported are {SUPPORTED} for SD 1.x / 2.x models")
    if unmapped:
        note = f" ({names.text_encoder_note})" if names.text_encoder_note and any(
            k.startswith(("lora_te_", "text_encoder.")) for k in unmapped) else ""
        log.warning("LoRA file %s: %d of %d keys name no layer of this model and are not applied%s, e.g. %s",
                    source, len(unmapped), len(tensors), note, ", ".join(unmapped[:SHOW]))
    log.info("LoRA file %s: %s; %d keys applied", source,
             ", ".join(f"{n} {kind} layers" for kind, n in sorted(kinds.items())), report.loaded)
    return LoraFile(source, deltas, report, kinds)


def _module_delta(layer, target, roles, tensors, names, source, peft_alphas):
    kinds = {kind for _, kind in roles.values() if kind is not None}
    if len(kinds) != 1:
        found = ", ".join(sorted(key for key, _ in roles.values()))
        has = "only an alpha" if not kinds else f"weights of several kinds ({found})"
        raise UserError(f"LoRA file '{source}': layer '{layer}' has {has}; the file is incomplete or corrupt")
    kind = kinds.pop()
    t = {role: tensors[key] for role, (key, _) in roles.items()}
    check = {"lora": _lora_shape, "loha": _loha_shape, "lokr": _lokr_shape}[kind]
    natural, rank = check(layer, t, source)
    shape = names.shape(target)
    if not _fits(kind, natural, shape):
        raise UserError(f"LoRA file '{source}': layer '{layer}' changes a {list(natural)} weight, but this "
                        f"model's {target.describe()} is {list(shape)}{_family_hint(natural, shape)}")
    alpha = float(t.pop("alpha").float()) if "alpha" in t else None
    scale = 1.0
    rank_root = rank
    if alpha is None and kind == "lora" and target.part in peft_alphas:
        alpha, rank_root = _peft_alpha(peft_alphas[target.part], layer, rank)
    if rank is not None and alpha:  # alpha missing or 0: alpha = rank, scale 1 (kohya, LyCORIS)
        scale = alpha / rank_root
    return ModuleDelta(layer, target, shape, kind, t, scale, keys=[key for key, _ in roles.values()])


def _need(layer, t, roles, source):
    missing = [r for r in roles if r not in t]
    if missing:
        raise UserError(f"LoRA file '{source}': layer '{layer}' lacks its {', '.join(missing)} weight; the file "
                        f"is incomplete or corrupt")


def _same(layer, source, what, a, b):
    if a != b:
        raise UserError(f"LoRA file '{source}': layer '{layer}' has inconsistent shapes ({what}: {a} vs {b}); "
                        f"the file is corrupt")


def _lora_shape(layer, t, source):
    """(natural shape of up @ down, rank) of a LoRA / LoCon layer."""
    _need(layer, t, ("down", "up"), source)
    up, down = t["up"], t["down"]
    if up.dim() < 2 or down.dim() < 2 or any(s != 1 for s in up.shape[2:]):
        raise UserError(f"LoRA file '{source}': layer '{layer}' has up {list(up.shape)} and down "
                        f"{list(down.shape)}; only [out, r] / [out, r, 1, 1] up weights are supported")
    _same(layer, source, "rank of up and down", up.shape[1], down.shape[0])
    return (up.shape[0], down.shape[1]) + tuple(down.shape[2:]), down.shape[0]


def _loha_shape(layer, t, source):
    _need(layer, t, ("w1_a", "w1_b", "w2_a", "w2_b"), source)
    w1 = (t["w1_a"].shape[0], t["w1_b"][0].numel())
    w2 = (t["w2_a"].shape[0], t["w2_b"][0].numel())
    _same(layer, source, "rank of hada_w1_a and hada_w1_b", t["w1_a"].shape[1], t["w1_b"].shape[0])
    _same(layer, source, "rank of hada_w2_a and hada_w2_b", t["w2_a"].shape[1], t["w2_b"].shape[0])
    _same(layer, source, "shape of the two Hadamard factors", w1, w2)
    return w1, t["w1_b"].shape[0]


def _lokr_shape(layer, t, source):
    for i in ("1", "2"):
        if f"w{i}" not in t:
            _need(layer, t, (f"w{i}_a", f"w{i}_b"), source)
            _same(layer, source, f"rank of lokr_w{i}_a and lokr_w{i}_b", t[f"w{i}_a"].shape[1], t[f"w{i}_b"].shape[0])
    w1 = tuple(t["w1"].shape) if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1])
    w2 = (t["w2"].shape[0], t["w2"][0].numel()) if "w2" in t else (t["w2_a"].shape[0], t["w2_b"][0].numel())
    rank = t["w1_b"].shape[0] if "w1_b" in t else t["w2_b"].shape[0] if "w2_b" in t else None
    return (w1[0] * w2[0], w1[1] * w2[1]), rank


def _fits(kind, natural, shape):
    """Whether a change of ``natural`` shape can be added to a weight of ``shape``. LoRA states its kernel
    size, so only a 1x1 conv and a linear layer may stand for each other (SD 1.x's conv proj_in is SD
    2.x's linear one); LoHa and LoKr factors are flat, so only the flattened sizes must agree."""
    if kind != "lora":
        return natural[0] == shape[0] and natural[1] == math.prod(shape[1:])

    def squeezed(s):
        return tuple(s[:2]) if len(s) > 2 and all(k == 1 for k in s[2:]) else tuple(s)
    return squeezed(natural) == squeezed(shape)


def _family_hint(natural, shape):
    widths = set(natural) | set(shape)
    if {768, 1024} <= widths:
        return "; the LoRA was made for another model (SD 1.x text features are 768 wide, SD 2.x 1024)"
    return "; the LoRA was made for another model"


def _peft_alphas(metadata, source):
    """``{part: PEFT LoraConfig fields}`` from diffusers' ``lora_adapter_metadata`` (keys ``unet.r``,
    ``unet.lora_alpha``, ``text_encoder.lora_alpha`` ...); empty without it."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("LoRA file %s: unreadable %s metadata ignored; alpha = rank", source, PEFT_METADATA_KEY)
        return {}
    configs = {}
    for key, value in packed.items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    return {part: config for part, config in configs.items() if "lora_alpha" in config}


def _peft_alpha(config, layer, rank):
    """(alpha, divisor) of a PEFT layer: ``alpha_pattern`` entries match a layer path that ends in them,
    else ``lora_alpha``; the divisor is the rank, or its square root with ``use_rslora``."""
    path = layer.partition(".")[2] if layer.startswith(("unet.", "text_encoder.")) else layer
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern):
            alpha = value
    return float(alpha), math.sqrt(rank) if config.get("use_rslora") else rank
