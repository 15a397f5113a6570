"""int8 dynamic quantization of the U-Net's Linear layers, on the CPU (PyTorch's ``torch.ao`` dynamic quantization:
weights stored as int8 per output channel, each call's activations quantized from their own range, int8 matrix
products in the fbgemm/x86 kernels, float32 out).

Every ``nn.Linear`` of the U-Net is swapped for a quantized copy, except the timestep and class embeddings: the
U-Net reads their weight's dtype to cast its inputs, and they act on one vector per sample. ``remove`` puts the
float modules back, untouched, so the model computes exactly as before. The quantized kernels take float32 only:
under a bfloat16 autocast (the default for full-size models on a CPU with native bfloat16) each copy quantizes
its input from float32 and hands back the input's dtype, while the rest of the U-Net stays in bfloat16.

The copy is made from the weights as they are when attached: merge LoRAs first (the copy then holds them) and
take them out only after ``remove``; hypernetworks act on the attention's context, not on the Linear layers, and
are unaffected. ``ldm.generate`` attaches it inside the EMA scope for one generation call.
"""
import warnings

import torch
from torch import nn

from ldm.errors import UserError

# the embeddings' first Linear sets the dtype the U-Net casts to (UNetModel.embed)
KEPT_FLOAT = ("time_embed", "label_emb")


class Int8Linear(nn.Module):
    """``quantized`` (a dynamically quantized Linear) for inputs of any float dtype: computed from float32, returned
    in the input's dtype."""

    def __init__(self, quantized):
        super().__init__()
        self.quantized = quantized
        self.in_features, self.out_features = quantized.in_features, quantized.out_features

    def forward(self, x):
        return self.quantized(x.float()).to(x.dtype)


def quantized_linear(linear):
    """An int8 dynamically quantized copy of ``linear`` (per-channel weight scales)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig
    linear.qconfig = per_channel_dynamic_qconfig
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 warns that its quantized tensor types will move to torchao
            warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated", category=UserWarning)
            return DynamicQuantizedLinear.from_float(linear)
    finally:
        del linear.qconfig


def check_int8_device(unet):
    device = next(unet.parameters()).device
    if device.type != "cpu":
        raise UserError(f"int8 dynamic quantization runs on the CPU only; the model is on {device}")


class Int8Linears:
    """The Linear layers of ``unet`` swapped for int8 dynamically quantized copies: ``attach()``, ``remove()``."""

    def __init__(self, unet):
        check_int8_device(unet)
        self.unet = unet
        self.swapped = []    # (parent, attribute name, the float Linear)

    def attach(self):
        if torch.backends.quantized.engine == "none":
            raise UserError("this PyTorch build has no quantized CPU engine; int8 is not available")
        for name, linear in self.unet.named_modules():
            if type(linear) is nn.Linear and name.split(".")[0] not in KEPT_FLOAT:
                parent_name, _, attribute = name.rpartition(".")
                self.swapped.append((self.unet.get_submodule(parent_name), attribute, linear))
        for parent, attribute, linear in self.swapped:
            setattr(parent, attribute, Int8Linear(quantized_linear(linear)))
        return self

    def remove(self):
        for parent, name, linear in reversed(self.swapped):
            setattr(parent, name, linear)
        self.swapped = []

    @property
    def count(self):
        return len(self.swapped)
