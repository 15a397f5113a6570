"""ControlNet units in PNG metadata, in the fields sd-webui-controlnet writes, so A1111's PNG Info reads
them back into its ControlNet units:

    ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Just
    Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0,
    Guidance End: 1, Pixel Perfect: True, Control Mode: Balanced, Hr Option: Both, Save Detected Map: True"

The model is named as its UI lists it: the file's stem and A1111's old 8-digit model hash. Our hints
are fitted to the output size by the unit's resize mode and made at that size ("Pixel Perfect"); guess
mode is its "ControlNet is more important" (the 0.825 ** (12 - i) weights, no control on the
unconditional half).
"""
from pathlib import Path

from cldm.preprocess import MODULE_NAMES

CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}


def model_label(path):
    """``<stem> [<hash>]`` for a ControlNet file, as sd-webui-controlnet lists its models."""
    from ldm.modules.lora.kohya_writer import legacy_model_hash
    stem = Path(path).stem.replace(",", "").replace(":", "")  # a ',' or ':' would split the field
    return f"{stem} [{legacy_model_hash(path)}]"


def _text(value):
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def unit_text(preprocessor, model, *, weight=1.0, start=0.0, end=1.0, guess_mode=False, processor_res=None,
              threshold_a=None, threshold_b=None, resize_mode="Crop and Resize"):
    """The value of one ``ControlNet N`` field; ``model`` as :func:`model_label` makes it, the
    preprocessor settings (resolution, thresholds) None where the preprocessor has none."""
    fields = (("Module", MODULE_NAMES.get(preprocessor, preprocessor)), ("Model", model), ("Weight", weight),
              ("Resize Mode", resize_mode), ("Low Vram", False), ("Processor Res", processor_res),
              ("Threshold A", threshold_a), ("Threshold B", threshold_b), ("Guidance Start", start),
              ("Guidance End", end), ("Pixel Perfect", True), ("Control Mode", CONTROL_MODES[bool(guess_mode)]),
              ("Hr Option", "Both"), ("Save Detected Map", True))
    return ", ".join(f"{label}: {_text(value)}" for label, value in fields if value is not None)
