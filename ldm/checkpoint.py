"""Reading checkpoints, loading them into models, and building a ready-to-sample model.

Loading is strict: every key is counted and every shape checked. When a checkpoint does not fit
the config, the error names the official config that does fit, worked out from the checkpoint's
own shapes (cross-attention width, U-Net input channels, extra sub-models).
"""
import hashlib
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "models/shapes/shapes-ldm.yaml"
DEFAULT_CKPT = "models/shapes/shapes-ldm.safetensors"
SD_CONFIG_DIR = "configs/stable-diffusion"

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
    .safetensors file, on the CPU, without running code from the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist; pass --ckpt with the path to a "
                        f".ckpt or .safetensors file")
    if path.is_dir():
        raise UserError(f"checkpoint '{path}' is a directory; pass the .ckpt or .safetensors "
                        f"file inside it")
    if path.suffix == ".safetensors":
        sd = _read_safetensors(path)
    else:
        sd = _read_torch(path)
    return _only_tensors(sd, path)


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint '{path}' is not a readable safetensors file "
                        f"({_first_line(err)}); it may be truncated or corrupt: download or "
                        f"convert it again") from None


# Unpickling arbitrary bytes can fail with almost any exception type (IndexError, KeyError,
# struct.error, ...); torch.load is the only call these guard, so all of them mean "unreadable".
UNREADABLE = Exception


def _read_torch(path):
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe and all(name.startswith(BOOKKEEPING_PREFIXES) for name in unsafe):
            log.info("checkpoint %s: replacing training bookkeeping (%s) with placeholders",
                     path, ", ".join(sorted(unsafe)))
            with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
                try:
                    return _torch_load(path)
                except UNREADABLE:
                    pass
        unsafe |= set(re.findall(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(err)))
        if unsafe:
            names = ", ".join(sorted(unsafe))
            raise UserError(f"checkpoint '{path}' needs code execution to load ({names}), which "
                            f"is refused for safety; convert it to .safetensors with a tool you "
                            f"trust, or re-save only its state_dict") from None
        raise UserError(_unreadable(path, err)) from None
    except UNREADABLE as err:
        raise UserError(_unreadable(path, err)) from None


def _unreadable(path, err):
    # torch wraps every weights-only failure in a long preamble; the cause follows this marker
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
    reason = detail.group(1) if detail else _first_line(err)
    return f"checkpoint '{path}' is not a readable PyTorch file ({reason}); it may be " \
           f"truncated or corrupt: download it again"


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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
    if any(k.startswith("control_model.") for k in keys):
        return "it is a ControlNet checkpoint (control_model.*): use ControlNet's " \
               "models/cldm_v15.yaml (SD 1.5) or models/cldm_v21.yaml (SD 2.1)"
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
        return f"use --config {d}v2-1-stable-unclip-{variant}-inference.yaml (stable unCLIP)"
    if in_channels == 9 and context_dim == 768:
        return "it is an SD 1.x inpainting checkpoint (9 input channels, 768-dim text): use " \
               "v1-inpainting-inference.yaml from the SD 1.5 inpainting release"
    if in_channels == 9:
        return f"use --config {d}v2-inpainting-inference.yaml (inpainting, 9 input channels)"
    if in_channels == 5:
        return f"use --config {d}v2-midas-inference.yaml (depth-conditioned, 5 input channels)"
    if in_channels == 7:
        return f"use --config {d}x4-upscaling.yaml (x4 upscaler, 7 input channels)"
    if in_channels == 4 and context_dim == 768:
        return f"use --config {d}v1-inference.yaml (SD 1.x, 768-dim CLIP text)"
    if in_channels == 4 and context_dim == 1024:
        return f"use --config {d}v2-inference-v.yaml for 768-v checkpoints (v-prediction, " \
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


def _ignorable(key, model_keys, has_ema):
    if key in model_keys:
        return False
    if key.startswith("model_ema.") and not has_ema:
        return True
    # transformers < 4.31 saved this buffer; newer versions rebuild it, so its absence is harmless
    return key == POSITION_IDS_KEY


def load_state_dict_into(model, sd, strict=True, *, config_name=None):
    """Load ``sd`` into ``model`` checking every key and shape; returns a :class:`LoadReport`.

    Tensors are cast to the dtype of the model's own parameters, so half-precision checkpoints
    load into a float32 model. ``model_ema.*`` keys are loaded when the model keeps an EMA and
    ignored otherwise. With ``strict`` any missing/unexpected/mismatched key is a UserError that
    names the config fitting the checkpoint; ``config_name`` is the config that was tried.
    """
    own = model.state_dict()
    has_ema = getattr(model, "use_ema", False) and hasattr(model, "model_ema")
    report = LoadReport()
    usable = {}
    for key, value in sd.items():
        if _ignorable(key, own, has_ema):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    report.missing = [k for k in own if k not in sd]
    report.loaded = len(usable)

    if strict and not report.ok:
        raise UserError(_mismatch_message(report, sd, own, config_name))
    model.load_state_dict(usable, strict=False)

    if report.ignored:
        ema = sum(k.startswith("model_ema.") for k in report.ignored)
        log.info("ignored %d checkpoint keys (%d model_ema.* without use_ema%s)",
                 len(report.ignored), ema,
                 ", position_ids" if POSITION_IDS_KEY in report.ignored else "")
    for name, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                       ("shape-mismatched", [k for k, _, _ in report.mismatched])):
        if keys:
            log.warning("%d %s keys (not strict), e.g. %s", len(keys), name, ", ".join(keys[:3]))
    log.info("loaded %d of %d model tensors", report.loaded, len(own))
    return report


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
    """Fill in the shipped default model; explain what to pass when something is missing."""
    if config_path is None and ckpt_path is None:
        config, ckpt = REPO_ROOT / DEFAULT_CONFIG, REPO_ROOT / DEFAULT_CKPT
        if not config.is_file() or not ckpt.is_file():
            raise UserError(f"the default model ({DEFAULT_CKPT} with {DEFAULT_CONFIG}) is "
                            f"missing; pass --ckpt and --config for the model to use")
        return config, ckpt
    if config_path is None:
        configs = sorted(p.name for p in (REPO_ROOT / SD_CONFIG_DIR).glob("*.yaml"))
        hint = _hint_for(ckpt_path)
        raise UserError(f"--ckpt needs --config too{hint}; configs in {SD_CONFIG_DIR}/: "
                        f"{', '.join(configs) or 'none found'}")
    if ckpt_path is None:
        if Path(config_path).resolve() == (REPO_ROOT / DEFAULT_CONFIG).resolve():
            return resolve_paths()
        raise UserError(f"--config '{config_path}' needs --ckpt with the weights it describes")
    return Path(config_path), Path(ckpt_path)


def _hint_for(ckpt_path):
    if Path(ckpt_path).suffix != ".safetensors":
        return ""
    try:
        fit = suggest_config(read_shapes(ckpt_path))
    except UserError:
        return ""
    return f" ({fit})" if fit else ""


def load_config(config_path):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml
    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"config '{path}' does not exist; pass --config with a .yaml file")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"config '{path}' is not valid YAML ({first}); fix or replace it") from None
    if not hasattr(config, "get") or config.get("model") is None:
        raise UserError(f"config '{path}' has no 'model' section; pass a model config such as "
                        f"{SD_CONFIG_DIR}/v2-inference.yaml")
    return config


def resolve_device(device=None):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"unknown device '{device}' ({err}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but CUDA is not available; use --device cpu")
    return device


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "full": torch.float32,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device):
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("float16 is not supported on the CPU; use bf16 or fp32")
    return dtype


def load_model(config_path=None, ckpt_path=None, device=None, dtype=None):
    """Build ``config.model``, load the checkpoint strictly, and return it in eval mode.

    With neither path given the shipped default model is used. ``dtype`` (default float32) is the
    dtype of the whole model; with float32, a config whose U-Net says ``use_bf16`` runs the U-Net
    in bfloat16, and one that says ``use_fp16`` runs it in float16 on CUDA only.
    """
    config_path, ckpt_path = resolve_paths(config_path, ckpt_path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = load_config(config_path)
    sd = read_state_dict(ckpt_path)
    log.info("building %s from %s", config.model.get("target", "?"), config_path)
    model = instantiate_from_config(config.model)
    load_state_dict_into(model, sd, strict=True, config_name=str(config_path))
    del sd
    model = model.eval().to(device=device, dtype=dtype)
    unet_dtype = _unet_dtype(config, device)
    if unet_dtype is not None and dtype == torch.float32:
        model.model.diffusion_model.to(unet_dtype)
        log.info("U-Net runs in %s (as the config asks)", unet_dtype)
    return model


def _unet_dtype(config, device):
    """use_bf16 holds on any device; use_fp16 only on CUDA (CPU float16 kernels are slow or
    missing, and the official configs set it for GPUs)."""
    unet = (config.model.get("params") or {}).get("unet_config") or {}
    params = unet.get("params") or {}
    if params.get("use_bf16"):
        return torch.bfloat16
    if params.get("use_fp16") and device.type == "cuda":
        return torch.float16
    return None
