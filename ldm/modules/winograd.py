"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, CVPR 2016), for CPU inference.

A 4x4 block of outputs of a 3x3 convolution needs 144 multiplications per (input, output) channel pair
done directly, and 36 in the Winograd domain: the 6x6 input tile and the 3x3 filter are transformed
(``B^T d B``, ``G g G^T``), multiplied elementwise (summed over input channels, which makes it 36
batched matrix products), and transformed back (``A^T m A``). Where the CPU's float32 convolutions are
slow (AVX2 only: 55-140 GFLOP/s in oneDNN against 156 for a large matmul) that pays even after the
transforms: 0.3-0.6x the time of the U-Net's convolutions with 256 or more channels, at every level
(bench/README.md); on AVX-512 CPUs, whose direct convolutions run near peak, it does not.

The result differs from the direct convolution by float32 rounding only (about 1e-5 of the output's
largest value: the transforms have coefficients up to 8 and 1/24). The transformed filter takes 4x the
memory of the filter and is cached (transforming it on every call costs more than it saves below 64x64
maps), so a memory budget per model decides which convolutions use it, those at the largest feature maps
first (past it, convolutions run directly); it is recomputed when the weight changes in place (a LoRA merged
or restored). Large maps are done in bands of tile rows, so the tiles in flight stay small.

    notation: d input tile 6x6, g filter 3x3, output tile y = A^T [(G g G^T) * (B^T d B)] A, 4x4
"""
import types

import torch
import torch.nn.functional as F
from torch import nn

_B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
TILE, WINDOW = 4, 6
CHUNK_BYTES = 16 << 20  # tiles of one band of a large feature map (see winograd_conv3x3)
# below this many input or output channels the transforms outweigh the products saved (a VAE's 128-channel
# convolutions at 512x512 ran 1.1x slower by Winograd, its 256-channel ones at 256x256 0.7x)
MIN_CHANNELS = 256


def _kron(m):
    m = torch.tensor(m, dtype=torch.float64)
    return torch.kron(m, m)  # vec(M X M^T) = kron(M, M) vec(X) for row-major vec


INPUT_TRANSFORM = _kron(_B_T).float()    # [36, 36]
OUTPUT_TRANSFORM = _kron(_A_T).float()   # [16, 36]
FILTER_TRANSFORM = _kron(_G)             # [36, 9], float64: done once per weight


def transform_filter(weight):
    """[K, C, 3, 3] filter -> [36, C, K] in the Winograd domain (computed in float64)."""
    k, c = weight.shape[:2]
    u = FILTER_TRANSFORM @ weight.detach().double().reshape(k * c, 9).T  # [36, K*C]
    return u.to(weight.dtype).view(36, k, c).transpose(1, 2).contiguous()


def winograd_conv3x3(x, filter_tf, bias=None):
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` given as ``transform_filter(weight)``."""
    n, c, h, w = x.shape
    k = filter_tf.shape[2]
    th, tw = -(-h // TILE), -(-w // TILE)
    x = F.pad(x, (1, TILE * tw + 1 - w, 1, TILE * th + 1 - h))  # [N, C, 4th+2, 4tw+2]
    # gathering the tiles with the channels innermost reads memory in order from an NHWC copy, not from C planes
    # far apart: the extra copy costs less than it saves (0.6x the time at 640 channels of 64x64)
    x = x.permute(0, 2, 3, 1).contiguous()
    # the tiles and their products take 2.25x the input and output each: large maps go in bands of tile rows
    # so that these temporaries stay bounded (a VAE's 512x512 maps would otherwise need gigabytes)
    band = max(1, CHUNK_BYTES // (WINDOW * WINDOW * n * tw * max(c, k) * x.element_size()))
    out = x.new_empty(n, k, TILE * th, TILE * tw)
    for first in range(0, th, band):
        rows = min(band, th - first)
        part = x[:, TILE * first:TILE * (first + rows) + 2]
        tiles = part.unfold(1, WINDOW, TILE).unfold(2, WINDOW, TILE)  # [N, rows, tw, C, 6, 6], a view
        tiles = tiles.permute(4, 5, 0, 1, 2, 3).reshape(WINDOW * WINDOW, -1)  # [36, N*rows*tw*C]
        v = (INPUT_TRANSFORM @ tiles).view(WINDOW * WINDOW, n * rows * tw, c)  # [36, T, C]
        m = torch.bmm(v, filter_tf)  # [36, T, K]
        y = (OUTPUT_TRANSFORM @ m.view(WINDOW * WINDOW, -1)).view(TILE, TILE, n, rows, tw, k)
        y = y.permute(2, 5, 3, 0, 4, 1)  # [N, K, rows, 4, tw, 4]
        target = out[:, :, TILE * first:TILE * (first + rows)].view(n, k, rows, TILE, tw, TILE)
        if bias is None:
            target.copy_(y)
        else:  # the bias rides on the copy into NCHW order
            torch.add(y, bias.view(1, k, 1, 1, 1, 1), out=target)
    if TILE * th != h or TILE * tw != w:
        out = out[:, :, :h, :w].contiguous()
    return out


def _qualifies(conv, min_channels):
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= min_channels)


def _cached_filter_bytes(conv):
    return conv.weight.numel() // 9 * WINDOW * WINDOW * conv.weight.element_size()


class _Plan:
    """Which of a model's convolutions may cache a transformed filter, decided once a whole forward has shown
    the feature-map area each one runs at: largest area first (the time saved grows with the area, the bytes
    held with the filter), smaller filter first on a tie, while ``budget_bytes`` lasts."""

    def __init__(self, budget_bytes, min_pixels):
        self.budget_bytes, self.min_pixels = budget_bytes, min_pixels
        self.areas = {}
        self.decided = budget_bytes == float("inf")  # no budget: nothing to plan, every filter is cached

    def see(self, conv, x):
        """Record ``conv``'s input; returns False while the plan is still being made (run directly)."""
        if self.decided:
            return True
        if conv in self.areas:  # its second call: one whole forward has passed
            self.decide()
            return True
        self.areas[conv] = x.shape[-2] * x.shape[-1] if x.dim() == 4 else 0
        return False

    def decide(self):
        left = self.budget_bytes
        ranked = sorted(self.areas.items(), key=lambda item: (-item[1], item[0].weight.numel()))
        for conv, area in ranked:
            size = _cached_filter_bytes(conv)
            conv.winograd_cached = area >= self.min_pixels and size <= left
            left -= size if conv.winograd_cached else 0
        self.decided = True


def _winograd_forward(conv, x):
    if not conv.winograd_plan.see(conv, x):
        return nn.Conv2d.forward(conv, x)
    use = (conv.winograd_cached and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
           and conv.weight.dtype == torch.float32 and x.shape[2] * x.shape[3] >= conv.winograd_plan.min_pixels
           and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)))
    if not use:
        return nn.Conv2d.forward(conv, x)
    version = (conv.weight.data_ptr(), conv.weight._version)
    if conv.winograd_cache is None or conv.winograd_cache[0] != version:
        conv.winograd_cache = (version, transform_filter(conv.weight))
    return winograd_conv3x3(x, conv.winograd_cache[1], conv.bias)


def use_winograd(model, min_size=8, budget_bytes=1 << 30, min_channels=None):
    """Run ``model``'s 3x3 stride-1 convolutions with at least ``min_channels`` (default
    :data:`MIN_CHANNELS`) input and output channels by F(4x4, 3x3) on float32 CPU inputs of at least
    ``min_size`` x ``min_size`` pixels (smaller ones, other devices and dtypes, and anything needing
    gradients run ``nn.Conv2d`` as before). A transformed filter is 4x its filter and is cached, so at most
    ``budget_bytes`` of them are held: the first forward runs directly and records the feature map each
    convolution sees, and from the second on the budget goes to the largest maps first (:class:`_Plan`);
    the convolutions left out run directly. With an infinite budget every one is cached from the first call.
    Returns the number of convolutions switched. The state dict is untouched; :func:`stop_winograd` undoes it."""
    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and _qualifies(m, min_channels)]
    plan = _Plan(budget_bytes, min_size * min_size)
    for conv in convs:
        conv.winograd_plan = plan
        conv.winograd_cached = plan.decided
        conv.winograd_cache = None
        conv.forward = types.MethodType(_winograd_forward, conv)
    return len(convs)


def stop_winograd(model):
    for module in model.modules():
        forward = vars(module).get("forward")
        if isinstance(module, nn.Conv2d) and getattr(forward, "__func__", None) is _winograd_forward:
            del module.forward
            module.winograd_cache = None
