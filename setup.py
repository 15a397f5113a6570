"""Installable packages ``ldm`` (Stable Diffusion 1.x/2.x) and ``cldm`` (ControlNet).

The pins are the versions the code and the reference manifests were checked against; key names
of the text encoders depend on them (transformers 5.x renames the CLIP text model's keys).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "pytorch-lightning==2.6.6",
    "omegaconf==2.4.0",
    "open_clip_torch==3.3.0",
    "transformers==4.57.6",
    "einops==0.8.2",
    "safetensors==0.8.0",
    "invisible-watermark==0.2.0",
    "timm==1.0.31",
    "kornia==0.9.0",
    "tqdm==4.70.1",
    "numpy==2.4.6",
    # every gradio 6 release (the "web" extra) needs pillow<13: one Pillow for every install
    "pillow==12.3.0",
]

setup(
    name="stable-diffusion",
    version="0.1.0",
    description="Latent diffusion / Stable Diffusion 1.x and 2.x: models, samplers and scripts",
    # cldm: ControlNet's official import path (cldm.cldm.ControlLDM), which its configs name
    packages=find_packages(include=["ldm", "ldm.*", "cldm", "cldm.*"]),
    license="MIT",
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.0.3"],
        # The web demos (scripts/gradio/). gradio 6.17.3 is the newest whose huggingface_hub range
        # still allows transformers 4.57's (<1.0).
        "web": ["gradio==6.17.3"],
    },
)
