"""Loading the ControlNet files people download, into a ``ControlLDM`` ready to sample.

Two layouts (key names as lllyasviel/ControlNet and ControlNet-v1-1 save them):

- full model, e.g. ``control_sd15_canny.pth`` (made by ``tool_add_control.py``): ``control_model.*``
  beside the whole SD model (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``, the schedule buffers and ``logvar``);
- control only, e.g. ``control_v11p_sd15_canny.pth`` and its fp16 safetensors extracts: the
  ControlNet's tensors with or without the ``control_model.`` prefix, attached to a base SD 1.x /
  2.x checkpoint, or loaded beside a ControlLDM's own as a further ControlNet (``load_control_net``).

Loading is strict, through ``ldm.checkpoint.load_state_dict_into`` like every other checkpoint. A
ControlNet made for another SD generation than the base is named as such (by the width of the
text context its cross-attention reads, 768 for SD 1.x and 1024 for SD 2.x) before any building.
"""
import copy
import logging
from pathlib import Path

from ldm.checkpoint import (
    CLDM_CONFIG_DIR,
    REPO_ROOT,
    UNET_IN_KEY,
    load_config,
    load_state_dict_into,
    place_model,
    read_state_dict,
    resolve_device,
    resolve_dtype,
)
from ldm.config_safety import trusting_configs
from ldm.errors import UserError
from ldm.model_markers import apply_markers, sibling_config
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."
# Every ControlNet has these; nothing else does.
CONTROLNET_KEYS = ("input_hint_block.0.weight", "zero_convs.0.0.weight")
GENERATIONS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
CONFIG_FOR_WIDTH = {768: "cldm_v15.yaml", 1024: "cldm_v21.yaml"}
# ControlNet 1.1 shuffle differs from the other SD 1.5 ControlNets only in its config; the file name
# is all that tells it apart (sd-webui-controlnet goes by the name too).
SHUFFLE_CONFIG = "control_v11e_sd15_shuffle.yaml"
# The ControlNet for the shipped model (with its config beside it as <stem>.yaml); scripts/controlnet.py
# uses it when neither --ckpt nor --control is given, once it exists.
DEFAULT_CONTROL = "models/shapes/shapes-controlnet.safetensors"


def read_control_file(path):
    """The ControlNet tensors of the file ``path``, keyed as ``cldm.cldm.ControlNet``'s state dict."""
    return control_part(read_state_dict(path), f"control file '{path}'")


def fit_projection_shapes(control, own):
    """``control`` with each transformer ``proj_in``/``proj_out`` weight reshaped to ``own``'s layout where
    only the layout differs: a 1x1 conv [C, C, 1, 1] against a linear [C, C] (some third-party
    extracts flatten the convs of SD 1.5 ControlNets, or keep SD 2.x's linear ones as 1x1 convs)."""
    fitted = dict(control)
    for key, value in control.items():
        if not key.endswith(("proj_in.weight", "proj_out.weight")) or key not in own:
            continue
        wanted = tuple(own[key].shape)
        if tuple(value.shape) != wanted and value.dim() in (2, 4) and len(wanted) in (2, 4) \
                and tuple(value.shape[:2]) == wanted[:2] and value.numel() == own[key].numel():
            fitted[key] = value.reshape(wanted)
    return fitted


def control_part(sd, source="this state dict"):
    """The ControlNet tensors of ``sd`` without the ``control_model.`` prefix; a UserError naming
    ``source`` when ``sd`` is no ControlNet."""
    problem = _unsupported_kind(sd)
    if problem is None:
        if any(k.startswith(PREFIX) for k in sd):
            sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
        if all(k in sd for k in CONTROLNET_KEYS):
            return sd
        problem = _what_it_is(sd)
    raise UserError(f"{source} {problem}")


def _unsupported_kind(sd):
    if "difference" in sd:
        return "is a 'difference' ControlNet (offsets from the SD 1.5 U-Net), which is not read here; " \
               "use the full ControlNet file (control_v11p_sd15_*.pth or an fp16 extract of it)"
    if "lora_controlnet" in sd:
        return "is a Control-LoRA, which is not read here; use a full ControlNet file"
    return None


def _what_it_is(sd):
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return "is a diffusers-format ControlNet; this loader reads the original layout (input_hint_block.*, " \
               "zero_convs.*) of lllyasviel's .pth files and their safetensors extracts"
    if UNET_IN_KEY in sd:
        return "is a Stable Diffusion checkpoint without ControlNet weights; give it as the base checkpoint " \
               "and a ControlNet file (such as control_v11p_sd15_canny.pth) as the control"
    example = next(iter(sd), None)
    return f"holds no ControlNet weights (no input_hint_block.* or zero_convs.* among its {len(sd)} tensors, " \
           f"e.g. '{example}'); give a ControlNet file such as control_v11p_sd15_canny.pth"


def text_width(sd, prefix=""):
    """Width of the text context that the cross-attention under ``prefix`` reads (attn2.to_k's
    input), or None when there is none."""
    for key, value in sd.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight"):
            return value.shape[1]
    return None


def generation(width):
    name = GENERATIONS.get(width)
    return f"{name} ({width}-dim text context)" if name else f"a model with {width}-dim text context"


def config_for(width, control_path=None):
    """The ControlNet config of ours for a text-context ``width``, or None."""
    if width not in CONFIG_FOR_WIDTH:
        return None
    name = CONFIG_FOR_WIDTH[width]
    if width == 768 and control_path is not None and "shuffle" in Path(control_path).name.lower():
        name = SHUFFLE_CONFIG
    return REPO_ROOT / CLDM_CONFIG_DIR / name


def default_config(ckpt_path, control_path, width):
    """The config beside the ControlNet file (ControlNet 1.1 ships ``<name>.yaml`` with every
    ``<name>.pth``), else ours for the text-context ``width``."""
    beside = sibling_config(control_path or ckpt_path)
    if beside is not None:
        log.warning("using the config %s found beside the ControlNet", beside)
        return beside
    chosen = config_for(width, control_path)
    if chosen is None:
        what = generation(width) if width else "a ControlNet without cross-attention"
        raise UserError(f"no ControlNet config of ours fits {what}; give the config the ControlNet was "
                        f"trained with")
    log.info("using the config %s for %s", chosen, generation(width))
    return chosen


def _config_width(config):
    unet = (config.model.get("params") or {}).get("unet_config") or {}
    return (unet.get("params") or {}).get("context_dim")


def check_generations(config, config_path, base, ckpt_path, control, control_path):
    """Refuse, before building, a base or a ControlNet of another SD generation than the config."""
    wanted = _config_width(config)
    base_width = text_width(base, UNET_PREFIX)
    if wanted is not None and base_width is not None and base_width != wanted:
        fitting = config_for(base_width)
        advice = f"use {fitting.relative_to(REPO_ROOT)}" if fitting else "give a config for that model"
        raise UserError(f"base checkpoint '{ckpt_path}' is {generation(base_width)} but config '{config_path}' "
                        f"is for {generation(wanted)}; {advice}")
    width = text_width(control)
    if wanted is not None and width is not None and width != wanted:
        fitting = config_for(width)
        other_base = f", or an {GENERATIONS[width]} base checkpoint with {fitting.relative_to(REPO_ROOT)}" \
            if fitting else ""
        raise UserError(f"ControlNet '{control_path or ckpt_path}' is for {generation(width)} but the base model "
                        f"is {generation(wanted)} (config '{config_path}'); use a ControlNet made for "
                        f"{GENERATIONS.get(wanted, 'that model')}{other_base}")


def load_controlnet_model(ckpt_path, control_path=None, config_path=None, device=None, dtype=None, *,
                          force_dtype=False, trust_config=False):
    """A ``ControlLDM`` in eval mode from a full ControlNet checkpoint (``ckpt_path`` alone), or from
    a base SD checkpoint ``ckpt_path`` plus the ControlNet file ``control_path`` (which replaces
    any ControlNet in ``ckpt_path``).

    Without ``config_path`` the config is the ``.yaml`` beside the ControlNet file, else
    ``configs/controlnet/cldm_v15.yaml`` or ``cldm_v21.yaml`` by the text width. ``device``,
    ``dtype``, ``force_dtype`` and ``trust_config`` are as for ``ldm.checkpoint.load_model``.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, force=force_dtype)
    control = None if control_path is None else read_control_file(control_path)
    sd = read_state_dict(ckpt_path)
    if control is None:
        if not any(k.startswith(PREFIX) for k in sd):
            raise UserError(f"checkpoint '{ckpt_path}' has no ControlNet weights (control_model.*); give a "
                            f"ControlNet file (such as control_v11p_sd15_canny.pth) to attach to it as well")
        control = control_part(sd, f"checkpoint '{ckpt_path}'")
    base = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
    del sd
    if config_path is None:
        config_path = default_config(ckpt_path, control_path, text_width(control))
    config = load_config(config_path, trust_config=trust_config)
    if (config.model.get("params") or {}).get("control_stage_config") is None:
        raise UserError(f"config '{config_path}' has no control_stage_config, so it builds no ControlNet; use "
                        f"{CLDM_CONFIG_DIR}/cldm_v15.yaml (SD 1.x) or {CLDM_CONFIG_DIR}/cldm_v21.yaml (SD 2.x)")
    check_generations(config, config_path, base, ckpt_path, control, control_path)
    apply_markers(config, base, config_path)
    with trusting_configs(trust_config):
        model = instantiate_from_config(config.model)
    log.info("ControlNet: %d tensors from %s", len(control), control_path or ckpt_path)
    control = fit_projection_shapes(control, model.control_model.state_dict())
    base.update({PREFIX + k: v for k, v in control.items()})
    # a base SD checkpoint has no logvar (only ControlNet's code saves it); it is a constant then
    keep_own = () if "logvar" in base else ("logvar",)
    load_state_dict_into(model, base, strict=True, config_name=str(config_path), ignore_keys=keep_own)
    return place_model(model, config, device, dtype, force_dtype=force_dtype)


def load_control_net(control_path, model, config_path=None, *, trust_config=False):
    """(ControlNet, global_average_pooling): a further ControlNet from the file ``control_path`` for
    the ControlLDM ``model`` (several at once: ``cldm.generate.ControlUnit``), on its device and dtype.

    Its architecture comes from ``config_path`` or the ``.yaml`` beside the file, else it is that of
    ``model``'s own ControlNet; pooling is the config's, else on for a shuffle file (by its name).
    """
    control = read_control_file(control_path)
    own = model.control_model
    width, wanted = text_width(control), text_width(own.state_dict())
    if width is not None and wanted is not None and width != wanted:
        raise UserError(f"ControlNet '{control_path}' is for {generation(width)} but the model's own ControlNet "
                        f"is for {generation(wanted)}; use ControlNets made for the same base model")
    config_path = config_path or sibling_config(control_path)
    if config_path is None:
        net = copy.deepcopy(own)
        pooling = "shuffle" in Path(control_path).name.lower()
    else:
        params = load_config(config_path, trust_config=trust_config).model.get("params") or {}
        if params.get("control_stage_config") is None:
            raise UserError(f"config '{config_path}' has no control_stage_config, so it builds no ControlNet; "
                            f"give the config the ControlNet was released with")
        with trusting_configs(trust_config):
            net = instantiate_from_config(params["control_stage_config"])
        pooling = bool(params.get("global_average_pooling", False))
    control = fit_projection_shapes(control, net.state_dict())
    load_state_dict_into(net, control, strict=True, config_name=str(config_path or "the model's own ControlNet"))
    log.info("ControlNet: %d tensors from %s", len(control), control_path)
    reference = next(own.parameters())
    return net.eval().to(device=reference.device, dtype=reference.dtype), pooling
