"""Building a model without initialising the parameters that a checkpoint is about to replace.

Random initialisation of SD's ~1 B parameters takes seconds and writes every page of them, only for
a strict load to overwrite each one right after. Inside :func:`skipped_weight_init`, the functions of
``torch.nn.init`` leave a parameter as it is; every torch layer initialises through them in
``reset_parameters``, and so do the zero-initialised layers of the U-Net (``zero_module``),
OpenCLIP and Hugging Face's CLIP (but for its token and position embeddings, which it fills
through the tensor itself). Parameters then stay ``torch.empty`` memory that the kernel has not
handed out yet.

Everything else in the constructors runs as usual. A plain tensor passed to an init function (a
buffer, or a tensor that becomes a parameter only afterwards) is still initialised, so buffers
computed in ``__init__`` (noise schedules, position ids, masks) come out as in a normal build.
Only for a model whose every parameter is then loaded: a parameter left out holds garbage.
Patches ``torch.nn.init`` for the duration, so do not build modules in other threads meanwhile.
"""
import contextlib
import functools

import torch

INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                  "orthogonal_", "sparse_")


@contextlib.contextmanager
def skipped_weight_init():
    """Inside the block, building a module leaves its parameters uninitialised (see the module doc)."""
    originals = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name, init in originals.items():
            setattr(torch.nn.init, name, _parameters_left_alone(init))
        yield
    finally:
        for name, init in originals.items():
            setattr(torch.nn.init, name, init)


def _parameters_left_alone(init):
    @functools.wraps(init)
    def init_unless_parameter(tensor, *args, **kwargs):
        if isinstance(tensor, torch.nn.Parameter):
            return tensor
        return init(tensor, *args, **kwargs)
    return init_unless_parameter
