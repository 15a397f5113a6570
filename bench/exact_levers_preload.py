"""Replay the official test vectors with exact speed levers on in every U-Net and VAE that ldm builds.

    python ../shared/reference/check_vectors.py --project . --preload bench/exact_levers_preload.py
    LDM_EXACT_LEVERS=winograd,channels_last,attention-math python ../shared/reference/check_vectors.py \
        --project . --preload bench/exact_levers_preload.py

check_vectors.py calls ``install(root)`` before it imports ``ldm``; the levers (``ldm.fast_inference``,
default ``winograd``) are then applied by each model's constructor, before its weights are loaded.
Winograd runs here at every feature-map size and channel count (the test models are small) with every
filter cached, so every 3x3 convolution of every check goes through it.
"""
import os
import sys

LEVERS = os.environ.get("LDM_EXACT_LEVERS", "winograd").split(",")


def _with_levers(cls):
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from ldm.fast_inference import apply_lever
        from ldm.modules.winograd import use_winograd

        for lever in LEVERS:
            if lever == "winograd":
                use_winograd(self, min_size=1, budget_bytes=float("inf"), min_channels=1)
            else:
                apply_lever(self, lever)

    cls.__init__ = __init__


def install(root):
    sys.path.insert(0, root)
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    for cls in (UNetModel, Encoder, Decoder):
        _with_levers(cls)
    print(f"exact levers on in every U-Net, Encoder and Decoder: {', '.join(LEVERS)}", file=sys.stderr)
