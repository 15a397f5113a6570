"""What ``scripts/controlnet.py`` adds to the common flags: the ControlNet files, hints and per-unit
settings, loading them, and turning them into ``cldm.generate.ControlUnit``s and PNG metadata.

Per-unit flags (``--hint``, ``--preprocess``, ``--control-strength``, ``--control-start``,
``--control-end``, ``--resize-mode``) are given once (for every ``--control``) or once per ``--control``, in order.
"""
from pathlib import Path

from cldm.preprocess import PREPROCESSORS, RESIZE_MODES
from ldm.cli import existing_file, number_in
from ldm.errors import UserError

# flag -> (args attribute, default): the settings each ControlNet unit has
UNIT_FLAGS = {"--hint": ("hint", None), "--preprocess": ("preprocess", "none"),
              "--control-strength": ("control_strength", 1.0), "--control-start": ("control_start", 0.0),
              "--control-end": ("control_end", 1.0), "--resize-mode": ("resize_mode", "crop-and-resize")}
MIDAS_TYPES = ("dpt_hybrid", "dpt_large", "midas_v21", "midas_v21_small")


def add_controlnet_args(parser):
    add = parser.add_argument
    add("--control", type=existing_file("ControlNet file"), action="append", default=None, metavar="FILE",
        help="a ControlNet (control_v11p_sd15_canny.pth, an fp16 .safetensors extract, or a full "
             "control_sd15_*.pth), attached to --ckpt; repeatable: their residuals add up")
    add("--hint", type=existing_file("hint image"), action="append", default=None, metavar="IMAGE",
        help="the hint, or the image --preprocess makes it from; one for all --control or one each")
    add("--preprocess", choices=PREPROCESSORS, action="append", default=None,
        help="make the hint from the image: canny edges, depth (needs --midas-weights), scribble (dark "
             "strokes), threshold (bright parts), none (the image is the hint; default)")
    add("--control-strength", type=number_in("--control-strength", 0.0), action="append", default=None,
        help="weight of the ControlNet's residuals (default 1; 0 = the base model's image)")
    add("--control-start", type=number_in("--control-start", 0.0, 1.0), action="append", default=None,
        help="fraction of the steps after which the ControlNet starts acting (default 0)")
    add("--control-end", type=number_in("--control-end", 0.0, 1.0), action="append", default=None,
        help="fraction of the steps after which it stops (default 1)")
    add("--resize-mode", choices=list(RESIZE_MODES), action="append", default=None,
        help="fitting a hint image of another aspect ratio: crop-and-resize (default: cover, cut the overhang), "
             "resize-and-fill (fit inside, pad with black), just-resize (stretch); as sd-webui-controlnet's")
    add("--guess-mode", action="store_true",
        help="residual i weighted 0.825 ** (12 - i) and no control on the unconditional side of guidance "
             "(sd-webui-controlnet's 'ControlNet is more important'); try it with an empty prompt")
    add("--only-mid-control", action="store_true", help="add only the middle block's residual")
    add("--canny-low", type=number_in("--canny-low", 0, 255, kind=int), default=100, help="canny's low threshold")
    add("--canny-high", type=number_in("--canny-high", 0, 255, kind=int), default=200, help="canny's high threshold")
    add("--threshold", type=number_in("--threshold", 0, 255, kind=int), default=127,
        help="binarisation level of scribble and threshold (0-255)")
    add("--midas-weights", type=existing_file("MiDaS weights file"), default=None, metavar="FILE",
        help="MiDaS release file for --preprocess depth (e.g. dpt_hybrid-midas-501f0c75.pt)")
    add("--midas-type", choices=MIDAS_TYPES, default="dpt_hybrid", help="the MiDaS model of --midas-weights")


def check_controlnet_args(args):
    """Refuse flag combinations that cannot work, before loading anything; sets ``args.units``: one
    dict of per-unit settings per ControlNet."""
    count = len(args.control or ()) or 1
    if not args.hint:
        raise UserError("--hint IMAGE is needed: the hint for the ControlNet, or the image --preprocess makes it from")
    if args.control and args.ckpt is None:
        raise UserError("--control needs --ckpt: the Stable Diffusion checkpoint the ControlNet is attached to")
    settings = {}
    for flag, (name, default) in UNIT_FLAGS.items():
        values = getattr(args, name) or [default]
        if len(values) not in (1, count):
            raise UserError(f"{flag} is given {len(values)} times for {count} ControlNets; give it once (for "
                            f"all) or once per --control")
        settings[name] = values * count if len(values) == 1 else values
    args.units = [dict(zip(settings, values)) for values in zip(*settings.values())]
    for i, unit in enumerate(args.units):
        if unit["control_start"] > unit["control_end"]:
            raise UserError(f"--control-start {unit['control_start']} is after --control-end {unit['control_end']} "
                            f"(ControlNet {i}); the start must not be after the end")
    if args.canny_low > args.canny_high:
        raise UserError(f"--canny-low {args.canny_low} is above --canny-high {args.canny_high}")
    if "depth" in settings["preprocess"] and args.midas_weights is None:
        raise UserError("--preprocess depth needs --midas-weights FILE (a MiDaS release such as "
                        "dpt_hybrid-midas-501f0c75.pt); or pass a depth map as --hint with --preprocess none")
    return args


def control_files(args):
    """(base checkpoint, ControlNet files): ``--ckpt`` with the ``--control`` files, or with the
    ControlNet inside it (None: a full control_sd15_*.pth); without either, the shipped ones."""
    from cldm.loading import DEFAULT_CONTROL
    from ldm.checkpoint import DEFAULT_CKPT, REPO_ROOT
    if args.ckpt is None:
        if not (REPO_ROOT / DEFAULT_CONTROL).is_file():
            raise UserError("no ControlNet is shipped with the default model yet: pass --control FILE (e.g. "
                            "control_v11p_sd15_canny.pth) and --ckpt, the checkpoint it is attached to")
        return REPO_ROOT / DEFAULT_CKPT, [REPO_ROOT / DEFAULT_CONTROL]
    return Path(args.ckpt), list(args.control or [None])


def load_controlnet_for(args):
    """The ControlLDM the flags name, with attention options set; ``args.control_models`` holds
    (ControlNet or None for its own, pooling) and ``args.control_labels`` the name of each unit's model."""
    from cldm.infotext import model_label
    from cldm.loading import load_control_net, load_controlnet_model
    from ldm.cli import TRUST_CONFIG_ADVICE, attention_options
    from ldm.config_safety import UntrustedConfigError
    from ldm.modules.attention import set_attention_options
    base, controls = control_files(args)
    force_bf16 = getattr(args, "bf16", False) == "force"
    try:
        model = load_controlnet_model(base, controls[0], args.config, device=args.device, force_dtype=force_bf16,
                                      trust_config=args.trust_config)
        extras = [load_control_net(path, model, trust_config=args.trust_config) for path in controls[1:]]
    except UntrustedConfigError as err:
        raise err.advise(TRUST_CONFIG_ADVICE) from None
    backend, upcast = attention_options(args)
    for net in [model] + [net for net, _ in extras]:
        set_attention_options(net, backend=backend, upcast=upcast)
    args.control_models = [(None, None)] + extras
    args.control_labels = [model_label(path or base) for path in controls]
    return model


def control_units(args, model):
    """(ControlUnits, hint images, ``ControlNet N`` metadata texts) from the flags, hints made at the
    size of the images to sample."""
    from cldm.generate import ControlUnit, hint_size
    from cldm.infotext import unit_text
    from cldm.preprocess import load_midas, open_hint_image, preprocess
    from ldm.generate import native_size
    H, W = args.H or native_size(model)[0], args.W or native_size(model)[1]
    midas = None
    if any(unit["preprocess"] == "depth" for unit in args.units):
        midas = load_midas(args.midas_weights, args.midas_type).to(next(model.parameters()).device)
    units, hints, texts = [], [], []
    for unit, (net, pooling), label in zip(args.units, args.control_models, args.control_labels):
        name = unit["preprocess"]
        hint = preprocess(open_hint_image(unit["hint"]), name, hint_size(model, H, W, net), low=args.canny_low,
                          high=args.canny_high, threshold=args.threshold, midas=midas,
                          what=f"hint image '{unit['hint']}'", resize_mode=unit["resize_mode"])
        units.append(ControlUnit(hint, unit["control_strength"], unit["control_start"], unit["control_end"],
                                 args.guess_mode, net, pooling))
        hints.append(hint)
        thresholds = {"canny": (args.canny_low, args.canny_high), "scribble": (args.threshold, None),
                      "threshold": (args.threshold, None)}.get(name, (None, None))
        texts.append(unit_text(name, label, weight=unit["control_strength"], start=unit["control_start"],
                               end=unit["control_end"], guess_mode=args.guess_mode,
                               resize_mode=RESIZE_MODES[unit["resize_mode"]],
                               processor_res=None if name == "none" else min(hint.size),
                               threshold_a=thresholds[0], threshold_b=thresholds[1]))
    return units, hints, texts
