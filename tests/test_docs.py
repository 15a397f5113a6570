"""What README.md and the licence files say about the shipped model holds for the files we ship."""
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from ldm.image_io import make_watermarker, put_watermark

REPO = Path(__file__).resolve().parent.parent


def _readme_section(heading):
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    return text[start:text.index("\n## ", start + 1)]


def test_readme_names_the_shipped_models_parameterization():
    config = OmegaConf.load(REPO / "models" / "shapes" / "shapes-ldm.yaml")
    actual = config.model.params.get("parameterization", "eps")
    other = {"eps": "v", "v": "eps"}[actual]
    description = _readme_section("## The shipped model").split("\n\n")[1]
    assert f"{actual}-prediction" in description and f"{other}-prediction" not in description


def test_readme_says_which_images_carry_the_watermark():
    scripts = _readme_section("## Scripts")
    assert "256x256" in scripts and "unmarked" in scripts
    # ...and it is so: a shipped-model-sized image comes back unchanged
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    assert put_watermark(image, make_watermarker()).tobytes() == image.tobytes()


def test_code_and_shipped_weights_have_a_licence():
    assert "MIT License" in (REPO / "LICENSE").read_text()
    model_licence = (REPO / "LICENSE-MODEL").read_text()
    assert "models/shapes/shapes-ldm.safetensors" in model_licence
    assert "ships no trained weights" not in model_licence
