"""Which kind of latent diffusion model a model is, from its class (never from attribute names)."""


def _family_classes():
    # imported on use: the model classes pull in Lightning
    from ldm.models.diffusion.ddpm import (ImageEmbeddingConditionedLatentDiffusion, LatentDepth2ImageDiffusion,
                                           LatentInpaintDiffusion, LatentUpscaleDiffusion)
    return (("inpainting", LatentInpaintDiffusion), ("depth", LatentDepth2ImageDiffusion),
            ("upscaling", LatentUpscaleDiffusion), ("unclip", ImageEmbeddingConditionedLatentDiffusion))


def model_family(model):
    """"inpainting", "depth", "upscaling", "unclip" or "txt2img"."""
    for family, cls in _family_classes():
        if isinstance(model, cls):
            return family
    return "txt2img"
