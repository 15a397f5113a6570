"""Reading checkpoints, loading them into models, and building a ready-to-sample model.

Loading is strict: every key is counted and every shape checked. When a checkpoint does not fit
the config, the error names the official config that does fit, worked out from the checkpoint's
own shapes (cross-attention width, U-Net input channels, extra sub-models).
"""
import hashlib
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.config_safety import check_config_targets, trusting_configs
from ldm.errors import UserError
from ldm.model_markers import MARKER_KEYS, apply_markers, derived_schedule_keys, sibling_config
from ldm.skip_init import skipped_weight_init
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "models/shapes/shapes-ldm.yaml"
DEFAULT_CKPT = "models/shapes/shapes-ldm.safetensors"
SD_CONFIG_DIR = "configs/stable-diffusion"
CLDM_CONFIG_DIR = "configs/controlnet"

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"
UNET_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
UNET_ADM_KEY = "model.diffusion_model.label_emb.0.0.weight"

# Training bookkeeping that old Lightning checkpoints pickle next to the weights (callback classes
# used as dict keys, numpy scalars for best scores, hyper-parameter containers). We discard all of
# it, so while unpickling it is replaced by an inert placeholder instead of importing real code.
BOOKKEEPING_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "numpy.",
                        "omegaconf.", "argparse.Namespace")


class _Inert:
    """Placeholder for a discarded bookkeeping object: accepts anything, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# ---------------------------------------------------------------------------------------------
# reading files

def read_state_dict(path):
    """Read a flat ``{key: tensor}`` dict from a .ckpt/.pt/.pth (Lightning-wrapped or not) or
    .safetensors file, on the CPU, without running code from the file.

    The tensors are mapped from the file, not read: a page is read when a tensor is first used,
    and the file is held in RAM once however many of these dicts and models share it. The mapping
    is private (copy-on-write): writing to a tensor is allowed and never reaches the file. Legacy
    (pre-zip) torch files cannot be mapped and are read whole. While the tensors are alive, renaming
    a new file over this one is safe (safetensors' ``save_file`` does that); rewriting it in place
    (``torch.save``, ``cp``) is not: the tensors see the new bytes, or, where the file got shorter,
    reading them kills the process (SIGBUS).
    """
    path = _readable_file(path, "checkpoint", "a .ckpt or .safetensors file")
    if path.suffix == ".safetensors":
        sd = read_safetensors_file(path)
    else:
        sd = _read_torch(path, "checkpoint", mmap=True)
    return _only_tensors(sd, path)


def read_torch_file(path, what="checkpoint"):
    """Unpickle a ``torch.save`` file on the CPU with ``weights_only`` (tensors and plain
    containers; never code from the file). ``what`` names the file in error messages."""
    return _read_torch(_readable_file(path, what, "the file"), what)


def _readable_file(path, what, kinds):
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} '{path}' does not exist; give the path to {kinds}")
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; give the path to {kinds} inside it")
    if path.stat().st_size == 0:
        raise UserError(f"{what} '{path}' is empty (0 bytes); download or save it again")
    return path


def read_safetensors_file(path, what="checkpoint", torch_suffix=".ckpt"):
    """``{key: tensor}`` of a safetensors file on the CPU; a damaged file, or a ``torch.save`` file given a
    .safetensors name, is a UserError naming it as ``what`` (and the suffix to rename the latter to)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        pytorch_format = _pytorch_format(path)
        if pytorch_format:
            raise UserError(f"{what} '{path}' is named .safetensors but is a PyTorch "
                            f"{pytorch_format} file, so it was not unpickled; if you expected a "
                            f"{torch_suffix}, rename it to {torch_suffix} to read its weights without running "
                            f"code") from None
        raise UserError(f"{what} '{path}' is not a readable safetensors file "
                        f"({_first_line(err)}); it may be truncated or corrupt: download or "
                        f"convert it again") from None


def _pytorch_format(path):
    """'zip' or 'pickle' when the file starts as torch.save writes, else None (a safetensors
    header is 8 length bytes then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) == 9 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[8:9] != b"{":
        return "pickle"
    return None


# Unpickling arbitrary bytes can fail with almost any exception type (IndexError, KeyError,
# struct.error, ...); torch.load is the only call these guard, so all of them mean "unreadable".
UNREADABLE = Exception


def _read_torch(path, what, mmap=False):
    try:
        return _torch_load(path, mmap)
    except pickle.UnpicklingError as err:
        failure = err
        unsafe = _unsafe_globals(path)
        if unsafe and all(name.startswith(BOOKKEEPING_PREFIXES) for name in unsafe):
            log.info("%s %s: replacing training bookkeeping (%s) with placeholders",
                     what, path, ", ".join(sorted(unsafe)))
            with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
                try:
                    return _torch_load(path, mmap)
                except UNREADABLE as retry_err:
                    # the bookkeeping was allowed, so this failure has a cause of its own
                    failure, unsafe = retry_err, set()
        unsafe |= set(re.findall(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(failure)))
        if unsafe:
            names = ", ".join(sorted(unsafe))
            raise UserError(f"{what} '{path}' needs code execution to load ({names}), which "
                            f"is refused for safety; convert it to .safetensors with a tool you "
                            f"trust, or re-save only its tensors") from None
        raise UserError(_unreadable(path, failure, what)) from None
    except UNREADABLE as err:
        raise UserError(_unreadable(path, err, what)) from None


def _unreadable(path, err, what):
    layout = _zip_layout_problem(path)
    if layout:
        return f"{what} '{path}' is {layout}"
    # torch wraps every weights-only failure in a long preamble; the cause follows this marker
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
    reason = detail.group(1) if detail else _first_line(err)
    # and zip failures in a C++ location prefix and a paragraph of advice
    reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)
    reason = reason.split(". This is an internal")[0]
    return f"{what} '{path}' is not a readable PyTorch file ({reason}); it may be " \
           f"truncated or corrupt: download it again"


def _zip_layout_problem(path):
    """Why a readable zip archive is no torch.save file (all members in one folder, with a
    data.pkl), or None when it is not a zip or looks right."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    root = names[0].split("/", 1)[0] if names and "/" in names[0] else ""
    outside = [n for n in names if not root or not n.startswith(root + "/")]
    if not root or f"{root}/data.pkl" not in names:
        return "a zip archive but not a torch.save file (no <folder>/data.pkl in it)"
    if outside:
        return f"a torch.save file with {len(outside)} extra member(s) outside its " \
               f"'{root}/' folder (e.g. '{outside[0]}'), which PyTorch refuses; remove them, or " \
               f"save its tensors again with torch.save"
    return None


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _torch_load(path, mmap=False):
    """``torch.load`` weights-only; ``mmap`` maps the tensors from a zip-format file instead of
    reading them (legacy pickles cannot be mapped and are read)."""
    mmap = mmap and _pytorch_format(path) == "zip"
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _unsafe_globals(path):
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):
        return set()


def _only_tensors(obj, path):
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict; "
                        f"pass a model checkpoint")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise UserError(f"checkpoint '{path}' holds no tensors; pass a model checkpoint")
    if len(sd) != len(obj):
        log.debug("checkpoint %s: skipped %d non-tensor entries", path, len(obj) - len(sd))
    return sd


def read_shapes(path):
    """Key -> shape without reading the weights when the format allows it (safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError):
            pass
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def file_hash(path, length=10):
    """The first ``length`` hex digits of the file's sha256 (the "model hash" in image metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# which config fits a checkpoint

def suggest_config(shapes):
    """Advice naming the config that fits a checkpoint, from its ``{key: shape}``; None if unknown.

    Only shapes are used, so eps and v-prediction 2.x checkpoints (identical shapes) both get named.
    """
    d = f"{SD_CONFIG_DIR}/"
    keys = set(shapes)
    is_controlnet = any(k.startswith(("control_model.", "input_hint_block.", "zero_convs.")) for k in keys)
    if is_controlnet and UNET_IN_KEY not in shapes:
        return "it is a ControlNet alone, without the Stable Diffusion model it controls: attach it " \
               "to a base checkpoint with cldm.loading.load_controlnet_model"
    if is_controlnet:
        return f"it is a ControlNet checkpoint (control_model.*): use the config " \
               f"{CLDM_CONFIG_DIR}/cldm_v15.yaml (SD 1.x) or {CLDM_CONFIG_DIR}/cldm_v21.yaml (SD 2.x)"
    if UNET_IN_KEY not in shapes:
        if any(k.startswith(("down_blocks.", "unet.", "text_encoder.")) for k in keys):
            return "it is a diffusers-format file; this code reads original-format checkpoints " \
                   "(keys model.diffusion_model.*)"
        if "encoder.conv_in.weight" in keys and "decoder.conv_out.weight" in keys:
            return "it is an autoencoder (VAE) alone, not a full latent diffusion checkpoint"
        return None
    in_channels = shapes[UNET_IN_KEY][1]
    context_dim = _context_dim(shapes)
    adm = shapes[UNET_ADM_KEY][1] if UNET_ADM_KEY in shapes else None
    if adm in (1536, 2048):
        variant = "l" if adm == 1536 else "h"
        return f"use the config {d}v2-1-stable-unclip-{variant}-inference.yaml (stable unCLIP)"
    if in_channels == 9 and context_dim == 768:
        return "it is an SD 1.x inpainting checkpoint (9 input channels, 768-dim text): use " \
               "v1-inpainting-inference.yaml from the SD 1.5 inpainting release"
    if in_channels == 9:
        return f"use the config {d}v2-inpainting-inference.yaml (inpainting, 9 input channels)"
    if in_channels == 5:
        return f"use the config {d}v2-midas-inference.yaml (depth-conditioned, 5 input channels)"
    if in_channels == 7:
        return f"use the config {d}x4-upscaling.yaml (x4 upscaler, 7 input channels)"
    if in_channels == 4 and context_dim == 768:
        return f"use the config {d}v1-inference.yaml (SD 1.x, 768-dim CLIP text)"
    if in_channels == 4 and context_dim == 1024:
        return f"use the config {d}v2-inference-v.yaml for 768-v checkpoints (v-prediction, " \
               f"768px) or {d}v2-inference.yaml for base checkpoints (eps, 512px)"
    return None


def _context_dim(shapes):
    for key, shape in shapes.items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            return shape[1]
    return None


# ---------------------------------------------------------------------------------------------
# loading weights into a model

@dataclass
class LoadReport:
    """What a load did: counts plus every key that did not line up."""
    loaded: int = 0
    ignored: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)   # (key, checkpoint shape, model shape)

    @property
    def ok(self):
        return not (self.missing or self.unexpected or self.mismatched)


def _ignorable(key, model_keys, has_ema, ignore_keys=()):
    if key.startswith(ignore_keys) or key in MARKER_KEYS:  # markers: see ldm.model_markers
        return True
    if key in model_keys:
        return False
    if key.startswith("model_ema.") and not has_ema:
        return True
    # transformers < 4.31 saved this buffer; newer versions rebuild it, so its absence is harmless
    return key == POSITION_IDS_KEY


def load_state_dict_into(model, sd, strict=True, *, config_name=None, ignore_keys=(), only_model=False,
                         assign=False):
    """Load ``sd`` into ``model`` checking every key and shape; returns a :class:`LoadReport`.

    Tensors are cast to the dtype of the model's own parameters, so half-precision checkpoints
    load into a float32 model. ``model_ema.*`` keys are loaded when the model keeps an EMA and
    ignored otherwise. With ``strict`` any missing/unexpected/mismatched key is a UserError that
    names the config fitting the checkpoint; ``config_name`` is the config that was tried.
    Otherwise missing, unexpected and mismatched keys are logged as warnings and skipped.

    ``ignore_keys`` (the official config parameter): checkpoint keys starting with any of these
    prefixes are not loaded, and the model keeps its own values for them. ``only_model`` (the
    official ``load_only_unet``) loads into the denoiser ``model.model`` alone: see
    :func:`_denoiser_part`.

    ``assign`` makes the tensors of ``sd`` the model's parameters and buffers instead of copying
    them in (one copy of the weights in RAM, not two): only for a ``sd`` that nothing else uses,
    as one fresh from :func:`read_state_dict`. A tensor is copied still where it must be: cast
    to the model's dtype, made contiguous, or sharing memory with another one of ``sd``.
    """
    report = LoadReport()
    if only_model:
        model, sd = model.model, _denoiser_part(sd, report)
    ignore_keys = tuple(ignore_keys)
    own = model.state_dict()
    has_ema = getattr(model, "use_ema", False) and hasattr(model, "model_ema")
    keep_own = derived_schedule_keys(model)
    if keep_own & sd.keys():
        log.info("zero terminal SNR: keeping the model's own schedule buffers, not the checkpoint's")
    usable = {}
    for key, value in sd.items():
        if _ignorable(key, own, has_ema, ignore_keys) or key in keep_own:
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    report.missing = [k for k in own if k not in sd and not k.startswith(ignore_keys) and k not in keep_own]
    report.loaded = len(usable)

    if strict and not report.ok:
        raise UserError(_mismatch_message(report, sd, own, config_name))
    if assign:
        model.load_state_dict(_assignable(usable, own), strict=False, assign=True)
    else:
        model.load_state_dict(usable, strict=False)

    if report.ignored:
        groups = sorted({k if k == POSITION_IDS_KEY else k.split(".", 1)[0] + ".*" for k in report.ignored})
        log.info("ignored %d checkpoint keys: %s", len(report.ignored), ", ".join(groups))
    for name, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                       ("shape-mismatched", [k for k, _, _ in report.mismatched])):
        if keys:
            log.warning("%d %s keys (not strict), e.g. %s", len(keys), name, ", ".join(keys[:3]))
    log.info("loaded %d of %d model tensors", report.loaded, len(own))
    return report


def _assignable(usable, own):
    """``usable`` as the model's own tensors: in the dtype of the model's, contiguous, aligned, and
    each in memory of its own, so that changing one weight in place (a LoRA merge) changes no other."""
    tensors = {key: _aligned(value.to(own[key].dtype).contiguous()) for key, value in usable.items()}
    # a file may hold one tensor under two keys (tied weights) or views that overlap
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, key) for key, t in tensors.items() if t.nbytes)
    reach = 0
    for start, end, key in spans:
        if start < reach:
            tensors[key] = tensors[key].clone()
        reach = max(reach, end)
    return tensors


def _aligned(tensor):
    # safetensors maps a tensor at whatever offset the file gives it; kernels may expect alignment
    return tensor.clone() if tensor.data_ptr() % tensor.element_size() else tensor


def _denoiser_part(sd, report):
    """The checkpoint as ``model.model`` sees it. A whole-model checkpoint (``model.*`` keys) is
    cut down to those keys with the prefix removed, its other keys counted as ignored; a
    checkpoint of the denoiser alone (what the official ``load_only_unet`` reads) is used as it is."""
    if not any(k.startswith("model.") for k in sd):
        return sd
    report.ignored.extend(k for k in sd if not k.startswith("model."))
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}


def _absent_modules(missing, sd):
    """The submodules (``depth_model.*``, ``embedder.*``) of which the checkpoint has no tensor at all."""
    prefixes = sorted({k.split(".", 1)[0] for k in missing})
    present = {k.split(".", 1)[0] for k in sd}
    absent = [p for p in prefixes if p not in present]
    return [f"{p}.*" for p in absent] if len(absent) == len(prefixes) else []


def _mismatch_message(report, sd, own, config_name):
    tried = f"config '{config_name}'" if config_name else "the config"
    counts = ", ".join(f"{len(v)} {name}" for name, v in (
        ("missing", report.missing), ("unexpected", report.unexpected),
        ("shape mismatches", report.mismatched)) if v)
    if report.missing and all(k.startswith("model_ema.") for k in report.missing) \
            and not report.unexpected and not report.mismatched:
        return f"{tried} sets use_ema but this checkpoint has no EMA weights ({counts}); " \
               f"set use_ema: False in the config"
    advice = suggest_config({k: tuple(v.shape) for k, v in sd.items()})
    if advice == suggest_config({k: tuple(v.shape) for k, v in own.items()}):
        advice = None  # checkpoint and model are of one family: what the checkpoint lacks says more
    if advice:
        return f"{tried} does not fit this checkpoint ({counts}); {advice}"
    if not any(k in own for k in sd):
        return f"this checkpoint shares no key with the model of {tried} (it holds {len(sd)} " \
               f"tensors such as '{next(iter(sd))}'; the model's keys are like " \
               f"'{next(iter(own))}'): it is not a weights file for this model; use the " \
               f"checkpoint released with the config"
    absent = _absent_modules(report.missing, sd)
    if absent and not report.unexpected and not report.mismatched:
        return f"this checkpoint has no weights for {', '.join(absent)} ({counts}), which {tried} " \
               f"needs; the file is incomplete or from another model: use the checkpoint released " \
               f"with this config"
    examples = [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in report.mismatched[:3]]
    examples += [f"missing {k}" for k in report.missing[:max(0, 3 - len(examples))]]
    examples += [f"unexpected {k}" for k in report.unexpected[:max(0, 3 - len(examples))]]
    return f"{tried} does not fit this checkpoint ({counts}; e.g. {'; '.join(examples)}); " \
           f"pass the config the checkpoint was trained with"


# ---------------------------------------------------------------------------------------------
# building a ready model

def resolve_paths(config_path=None, ckpt_path=None):
    """Fill in the shipped default model, or the ``<stem>.yaml`` beside a checkpoint given without
    a config (ldm.model_markers); explain what to pass when something is missing."""
    if config_path is None and ckpt_path is None:
        config, ckpt = REPO_ROOT / DEFAULT_CONFIG, REPO_ROOT / DEFAULT_CKPT
        if not config.is_file() or not ckpt.is_file():
            raise UserError(f"the default model ({DEFAULT_CKPT} with {DEFAULT_CONFIG}) is "
                            f"missing; give the checkpoint and the config of the model to use")
        return config, ckpt
    if config_path is None:
        beside = sibling_config(ckpt_path)
        if beside is not None:
            log.warning("using the config %s found beside the checkpoint", beside)
            return beside, Path(ckpt_path)
        configs = sorted(p.name for p in (REPO_ROOT / SD_CONFIG_DIR).glob("*.yaml"))
        hint = _hint_for(ckpt_path)
        raise UserError(f"checkpoint '{ckpt_path}' needs a config too{hint}: give one, or put it beside "
                        f"the checkpoint as '{Path(ckpt_path).with_suffix('.yaml').name}'; configs in "
                        f"{SD_CONFIG_DIR}/: {', '.join(configs) or 'none found'}")
    if ckpt_path is None:
        if Path(config_path).resolve() == (REPO_ROOT / DEFAULT_CONFIG).resolve():
            return resolve_paths()
        raise UserError(f"config '{config_path}' needs a checkpoint too, with the weights it "
                        f"describes")
    return Path(config_path), Path(ckpt_path)


def _hint_for(ckpt_path):
    if Path(ckpt_path).suffix != ".safetensors":
        return ""
    try:
        fit = suggest_config(read_shapes(ckpt_path))
    except UserError:
        return ""
    return f" ({fit})" if fit else ""


def load_config(config_path, trust_config=False):
    """Read a model config; unless ``trust_config``, every ``target`` in it must be in a trusted
    module (``ldm.config_safety``), checked before anything is imported or built."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml
    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"config '{path}' does not exist; give the path to a model .yaml file")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"config '{path}' is not valid YAML ({first}); fix or replace it") from None
    if not hasattr(config, "get") or config.get("model") is None:
        raise UserError(f"config '{path}' has no 'model' section; pass a model config such as "
                        f"{SD_CONFIG_DIR}/v2-inference.yaml")
    if not trust_config:
        check_config_targets(config, source=path)
    return config


def resolve_device(device=None):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"unknown device '{device}' ({err}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but CUDA is not available; run on the cpu device")
    return device


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "full": torch.float32,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device, *, force=False):
    """The dtype to run for a ``dtype`` argument (None: float32); on a CPU without native
    bfloat16/float16 that is float32 unless ``force`` (see ``ldm.precision``)."""
    from ldm.precision import choose_precision
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return choose_precision(dtype, device, force=force, requested_by="dtype",
                            force_hint="force_dtype=True").dtype


def load_model(config_path=None, ckpt_path=None, device=None, dtype=None, *, force_dtype=False,
               trust_config=False):
    """Build ``config.model``, load the checkpoint strictly, and return it in eval mode.

    With neither path given the shipped default model is used. ``dtype`` (default float32) is the
    dtype of the whole model; with float32, a config whose U-Net says ``use_bf16`` runs the U-Net
    in bfloat16, and one that says ``use_fp16`` runs it in float16 on CUDA only. On a CPU without
    native bfloat16/float16 (``ldm.precision``) those run in float32 with a warning, unless
    ``force_dtype``. The config may only name targets of ``ldm.config_safety.TRUSTED_MODULES``
    unless ``trust_config`` (a config can run any code).

    Without ``config_path``, the ``<checkpoint stem>.yaml`` beside the checkpoint is its config
    (checked like any other). Marker keys in the checkpoint (``v_pred``, ``ztsnr``) set the
    parameterization and the zero-terminal-SNR schedule over what the config says, with a
    warning: see ``ldm.model_markers``.
    """
    config_path, ckpt_path = resolve_paths(config_path, ckpt_path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, force=force_dtype)
    config = load_config(config_path, trust_config=trust_config)
    sd = read_state_dict(ckpt_path)
    apply_markers(config, sd, config_path)
    log.info("building %s from %s", config.model.get("target", "?"), config_path)
    # every parameter is loaded (strictly) right after, so random initialisation would be wasted
    with trusting_configs(trust_config), skipped_weight_init():
        model = instantiate_from_config(config.model)
    load_state_dict_into(model, sd, strict=True, config_name=str(config_path), assign=True)
    del sd
    return place_model(model, config, device, dtype, force_dtype=force_dtype)


def place_model(model, config, device, dtype, *, force_dtype=False):
    """``model`` in eval mode on ``device`` in ``dtype`` (both resolved); a float32 model runs its
    U-Net in the dtype its ``config`` asks for (an explicit dtype wins), see :func:`_unet_dtype`."""
    model = model.eval().to(device=device, dtype=dtype)
    unet_dtype = _unet_dtype(config, device, force=force_dtype) if dtype == torch.float32 else None
    if unet_dtype is not None:
        model.model.diffusion_model.to(unet_dtype)
        log.info("U-Net runs in %s (as the config asks)", unet_dtype)
    return model


def _unet_dtype(config, device, force=False):
    """The U-Net dtype a config asks for, or None for the model's own. use_bf16 holds on CUDA and
    on a CPU with native bfloat16 (elsewhere only when ``force``, see ``ldm.precision``);
    use_fp16 only on CUDA: the official 2.x configs set it for GPUs, so it is no request to run
    float16 on a CPU (pass dtype="fp16" for that)."""
    from ldm.precision import choose_precision
    unet = (config.model.get("params") or {}).get("unet_config") or {}
    params = unet.get("params") or {}
    if params.get("use_bf16"):
        chosen = choose_precision(torch.bfloat16, device, force=force,
                                  requested_by="the config's use_bf16", force_hint="force_dtype=True")
        return chosen.dtype if chosen.dtype != torch.float32 else None
    if params.get("use_fp16"):
        if device.type == "cuda":
            return torch.float16
        log.info("the config's use_fp16 is for CUDA: on %s the U-Net runs in the model's dtype",
                 device.type)
    return None
