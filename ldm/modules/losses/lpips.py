"""LPIPS perceptual distance (Zhang et al. 2018) over VGG16 features, built without downloading anything.

The network is assembled from its architecture; its weights (ImageNet VGG16 features plus the five
learned linear heads) come from a local file named by ``perceptual_weights_path``. Accepted key layouts:

- this module's own keys (``net.slice1.0.weight`` ..., ``lin0.model.1.weight`` ...), optionally under
  ``loss.perceptual_loss.`` or ``perceptual_loss.`` (so an official autoencoder training checkpoint works);
- torchvision VGG16 keys (``features.0.weight`` ...) for the backbone, next to ``lin*.model.1.weight``.
"""
import logging

import torch
from torch import nn

from ldm.errors import UserError
from ldm.modules.freeze import freeze_module

logger = logging.getLogger(__name__)

# torchvision VGG16 ``features`` indices: "M" is a max-pool, numbers are 3x3 conv widths (each followed by ReLU)
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the feature indices where each slice ends
SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)
PREFIXES = ("loss.perceptual_loss.", "perceptual_loss.")


def vgg16_features():
    """The 30 first layers of torchvision's ``vgg16().features`` (up to relu5_3), randomly initialised."""
    layers, width = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(width, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            width = item
    return layers


class VGG16Slices(nn.Module):
    """VGG16 features cut into five slices whose outputs are the LPIPS taps; the slice modules keep the
    torchvision feature indices as names (``slice2.5`` is ``features.5``)."""

    def __init__(self):
        super().__init__()
        layers = vgg16_features()
        start = 0
        for i, end in enumerate(SLICE_ENDS):
            block = nn.Sequential()
            for index in range(start, end):
                block.add_module(str(index), layers[index])
            setattr(self, f"slice{i + 1}", block)
            start = end

    def forward(self, x):
        taps = []
        for i in range(len(SLICE_ENDS)):
            x = getattr(self, f"slice{i + 1}")(x)
            taps.append(x)
        return taps


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the input statistics the LPIPS VGG expects."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A learned non-negative 1x1 channel weighting of squared feature differences (``model.1.weight``)."""

    def __init__(self, chn_in, chn_out=1):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))


def normalize_tensor(x, eps=1e-10):
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Distance [B, 1, 1, 1] between two image batches in [-1, 1]; frozen and always in eval mode (the
    official loss lets Lightning switch the heads' dropout on during training, which makes the metric noisy)."""

    def __init__(self, weights_path=None):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for i, chn in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(chn))
        if weights_path is not None:
            self.load_weights(weights_path)
        freeze_module(self)

    def load_weights(self, path):
        from ldm.checkpoint import read_state_dict
        sd = _lpips_keys(read_state_dict(path))
        own = self.state_dict()
        missing = [k for k in own if k not in sd and not k.startswith("scaling_layer.")]
        if missing:
            raise UserError(f"perceptual_weights_path '{path}' lacks {len(missing)} LPIPS tensors (e.g. "
                            f"{', '.join(missing[:3])}); it needs VGG16 features and the lin0-lin4 heads")
        for key, value in own.items():
            if key in sd and sd[key].shape != value.shape:
                raise UserError(f"perceptual_weights_path '{path}': {key} has shape {tuple(sd[key].shape)}, "
                                f"expected {tuple(value.shape)}")
        self.load_state_dict({k: sd.get(k, v) for k, v in own.items()})
        logger.info("LPIPS: loaded VGG16 features and linear heads from %s", path)

    def forward(self, input, target):
        taps0 = self.net(self.scaling_layer(input))
        taps1 = self.net(self.scaling_layer(target))
        total = 0
        for i, (f0, f1) in enumerate(zip(taps0, taps1)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            total = total + getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _lpips_keys(sd):
    """Rename the accepted layouts (see module docstring) to this module's keys."""
    feature_to_slice = {}
    start = 0
    for i, end in enumerate(SLICE_ENDS):
        for index in range(start, end):
            feature_to_slice[index] = f"net.slice{i + 1}.{index}"
        start = end
    out = {}
    for key, value in sd.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith("features."):
            index, _, rest = key[len("features."):].partition(".")
            if not index.isdigit() or int(index) not in feature_to_slice:
                continue
            key = f"{feature_to_slice[int(index)]}.{rest}"
        out[key] = value
    return out
