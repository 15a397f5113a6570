"""Speed levers for inference that keep the result (float32 rounding aside), each opt-in and named.

bench/unet_step.py measures each alone against the plain model and diffusers (bench/README.md has
what paid and what did not); the sampling scripts turn on the ones that paid.

- ``winograd``: 3x3 convolutions on CPU feature maps by F(4x4, 3x3) (``ldm.modules.winograd``), caching at
  most 1 GiB of transformed filters (the largest feature maps first).
- ``winograd-all``: the same with every transformed filter cached (for the SD 2.x U-Net 8.7 GB beside its
  3.5 GB of weights).
- ``channels_last``: weights and activations in NHWC order, the layout oneDNN convolutions prefer.
- ``compile``: ``torch.compile`` (inductor) of the whole network; the first call compiles (minutes on a
  small CPU), later processes reuse inductor's on-disk cache.
- ``compile-freezing``: the same with inductor's freezing (weights folded in as constants, convolution
  and matmul weights prepacked for oneDNN); inference only.
- ``attention-math``: attention as two matmuls and a softmax instead of PyTorch's fused SDPA kernel.
- ``attention-no-upcast``: attention in the autocast dtype everywhere (what ``ATTN_PRECISION=fp16``
  does in the scripts); under a CPU bfloat16 autocast that is already the default.
- ``attention-upcast``: attention in float32 under a CPU bfloat16 autocast too (``ATTN_PRECISION=fp32``),
  to time what the default leaves out.

Two more are process settings, not model changes, so they have no function here: the memory allocator
(jemalloc or tcmalloc through ``LD_PRELOAD``, see bench/README.md) and the thread count.
"""
import torch

from ldm.errors import UserError

LEVERS = ("winograd", "winograd-all", "channels_last", "compile", "compile-freezing", "attention-math",
          "attention-no-upcast", "attention-upcast")


def apply_lever(model, name):
    """Turn lever ``name`` on for ``model`` (in place); returns ``model``."""
    if name not in LEVERS:
        raise UserError(f"unknown speed lever '{name}'; use one of {', '.join(LEVERS)}")
    if name.startswith("winograd"):
        from ldm.modules.winograd import use_winograd
        use_winograd(model, budget_bytes=1 << 30 if name == "winograd" else float("inf"))
    elif name == "channels_last":
        model.to(memory_format=torch.channels_last)
    elif name.startswith("attention-"):
        from ldm.modules.attention import set_attention_options
        if name == "attention-math":
            set_attention_options(model, backend="math")
        else:
            set_attention_options(model, upcast=name == "attention-upcast")
    else:
        if name == "compile-freezing":
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
        model.compile()
    return model
