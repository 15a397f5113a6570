"""Encoder interface and helpers shared by the conditioning encoders."""
import torch.nn as nn


class AbstractEncoder(nn.Module):
    """A conditioning encoder: ``encode(x)`` turns raw conditioning into what the diffusion model consumes."""

    def encode(self, *args, **kwargs):
        raise NotImplementedError


class IdentityEncoder(AbstractEncoder):
    """Passes conditioning through unchanged (for conditioning that is already a tensor)."""

    def encode(self, x):
        return x


def disabled_train(self, mode=True):
    """Replacement for ``Module.train`` that keeps a frozen module in eval mode whatever its parent does."""
    return self


def parameter_device(module):
    """Device of ``module``'s own weights: inputs go there, whatever device string a config asked for."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    raise ValueError(f"{type(module).__name__} has no parameters or buffers to take a device from")


def freeze_module(module):
    """Put ``module`` in eval mode and stop gradients to all its parameters."""
    module.eval()
    for param in module.parameters():
        param.requires_grad = False
