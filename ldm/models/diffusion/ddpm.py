"""The official import path of the diffusion models; the classes live in focused modules.

    ddpm_base.py        DDPM, DiffusionWrapper
    latent_diffusion.py LatentDiffusion
    schedule.py         the schedule buffers and eps / x0 / v algebra
    training.py         Lightning steps, EMA updates, optimizers
"""
from ldm.models.diffusion.ddpm_base import DDPM, DiffusionWrapper, disabled_train  # noqa: F401
from ldm.models.diffusion.latent_diffusion import LatentDiffusion  # noqa: F401
from ldm.models.diffusion.finetune import LatentFinetuneDiffusion, LatentInpaintDiffusion  # noqa: F401
from ldm.models.diffusion.depth import LatentDepth2ImageDiffusion  # noqa: F401
from ldm.models.diffusion.upscale import LatentUpscaleDiffusion  # noqa: F401
from ldm.models.diffusion.unclip import ImageEmbeddingConditionedLatentDiffusion  # noqa: F401
