"""Encoder interface and helpers shared by the conditioning encoders."""
import torch.nn as nn

from ldm.modules.freeze import disabled_train, freeze_module  # noqa: F401  (also the encoders' import path)


class AbstractEncoder(nn.Module):
    """A conditioning encoder: ``encode(x)`` turns raw conditioning into what the diffusion model consumes."""

    def encode(self, *args, **kwargs):
        raise NotImplementedError

    def freeze(self):
        """Fix the weights for good: eval mode that survives a parent's ``.train()``, no gradients."""
        freeze_module(self)


class IdentityEncoder(AbstractEncoder):
    """Passes conditioning through unchanged (for conditioning that is already a tensor)."""

    def encode(self, x):
        return x


def parameter_device(module):
    """Device of ``module``'s own weights: inputs go there, whatever device string a config asked for."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    raise ValueError(f"{type(module).__name__} has no parameters or buffers to take a device from")
