"""Tiled decode and encode for the KL autoencoder, so that large images fit in the memory of small ones.

The decoder's activations grow with the image: at full resolution a 1024x1024 decode holds tensors
of 256 channels x 1024 x 1024 (1 GiB each in float32), four times those of a 512x512 one. Tiling
cuts the image into overlapping tiles of at most ``tile`` pixels, runs each through the network on
its own and blends the overlaps with linear ramps, as diffusers' ``tiled_decode`` and A1111's
"Tiled VAE" do; the peak is then that of one tile.

A tile run alone differs from the same region of the whole image in three ways, and each is
handled (bench/vae_decode.py measures the PSNR against the untiled decode, bench/README.md has the
numbers behind the defaults):

- the middle block's attention sees only the tile: the part of the network at latent resolution
  (the decoder's conv_in and middle, the encoder's middle and output layers) runs on the whole
  latent, whose activations are small (512 x 128 x 128 floats for a 1024px image), and only the
  levels at image resolution are tiled;
- GroupNorm normalises with the tile's own statistics, so tiles differ in tone: with
  ``image_norms`` a first pass over the tiles gathers every GroupNorm's statistics over the whole
  image (each position weighted by its blend weight, so it counts once) and the second pass uses
  them in every tile, as the untiled network would (twice the tile work); with ``preview_norms``
  the statistics come instead from one untiled run on the input shrunk to fit a tile (the Tiled
  VAE extension for A1111 estimates them from a downscaled copy in its fast mode), a quarter of
  the work for a 1024px image, at the cost of statistics that are estimates;
- convolutions see zero padding at the tile's border, which spoils the output a few dozen pixels
  in: the linear ramps give a tile's border little weight (giving its outer quarter of each
  overlap no weight at all measured no better).

``mode`` is "off" (never tile), "on" (tile whenever the image is larger than one tile) or "auto"
(tile only images larger than ``AUTO_MAX_PIXELS``, so that every model's native size decodes
untiled and exactly as before).
"""
import functools
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

MODES = ("auto", "on", "off")
# where the tiles' GroupNorm statistics come from: the whole image (a first pass over the tiles) or a preview
STATS = ("image", "preview")
# A tile's side and the overlap of neighbouring tiles, in image pixels (divided by the latent
# factor in latent space). A 512 px tile peaks as a 512x512 decode does; see bench/README.md
# for the overlap.
TILE_PIXELS = 512
OVERLAP_PIXELS = 128
# "auto" tiles images of more pixels than this: 768x768 is the largest native size (SD 2.x 768-v)
# and its untiled decode needs about 2.3x the activations of a 512x512 one; 1024x1024 needs 4x.
AUTO_MAX_PIXELS = 768 * 768


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap of neighbours in image pixels (multiples of the latent factor)."""
    tile: int = TILE_PIXELS
    overlap: int = OVERLAP_PIXELS
    # GroupNorm statistics of the whole image, from a first pass over the tiles
    image_norms: bool = True
    # ... or from one run on the input shrunk to fit a tile (needs image_norms)
    preview_norms: bool = False

    def __post_init__(self):
        if not 0 <= self.overlap < self.tile:
            raise UserError(f"VAE tiling needs 0 <= overlap < tile, got tile {self.tile}, overlap {self.overlap}")
        if self.preview_norms and not self.image_norms:
            raise UserError("VAE tiling's preview_norms estimates the whole image's GroupNorm statistics: "
                            "it needs image_norms")

    def in_latent(self, factor):
        """(tile, overlap) in latent pixels."""
        return self.tile // factor, self.overlap // factor


def check_mode(mode):
    if mode not in MODES:
        raise UserError(f"VAE tiling '{mode}' is unknown; use {', '.join(MODES)}")
    return mode


def check_stats(stats):
    if stats not in STATS:
        raise UserError(f"VAE tiling statistics '{stats}' are unknown; use {', '.join(STATS)}")
    return stats


def tiling_for(stats):
    """The default :class:`Tiling` with GroupNorm statistics of the whole image or of a preview."""
    return Tiling(preview_norms=check_stats(stats) == "preview")


def tiles_image(mode, height, width):
    """Whether ``mode`` tiles an image of ``height`` x ``width`` pixels."""
    check_mode(mode)
    return mode == "on" or (mode == "auto" and height * width > AUTO_MAX_PIXELS)


def latent_factor(autoencoder):
    """Image pixels per latent pixel: 2 ** (resolutions - 1)."""
    return 2 ** (autoencoder.encoder.num_resolutions - 1)


def can_tile(autoencoder):
    """Whether ``autoencoder`` is a KL autoencoder whose halves can be run apart (not an identity stage)."""
    return all(hasattr(autoencoder, name) for name in ("encoder", "decoder", "quant_conv", "post_quant_conv"))


def tile_spans(size, tile, overlap):
    """[(start, end), ...] covering range(size) with as few equal tiles of at most ``tile`` as keep
    neighbours overlapping by at least ``overlap``, spread evenly (no thin tile at the end)."""
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (count - 1) * overlap) / count)
    return [(s, s + length) for s in (round(i * (size - length) / (count - 1)) for i in range(count))]


def blend_weights(spans, scale):
    """One weight vector per span (``scale`` weights per span unit): a linear ramp across each overlap
    with a neighbour, 1 elsewhere; normalised to sum to 1 at every position."""
    weights = []
    for i, (start, end) in enumerate(spans):
        position = torch.arange((end - start) * scale, dtype=torch.float64) + 0.5
        weight = torch.ones_like(position)
        for neighbour, distance in ((i - 1, position), (i + 1, position.flip(0))):
            if 0 <= neighbour < len(spans):
                shared = (min(end, spans[neighbour][1]) - max(start, spans[neighbour][0])) * scale
                weight = torch.minimum(weight, (distance / shared).clamp(max=1.0))
        weights.append(weight)
    total = torch.zeros(spans[-1][1] * scale, dtype=torch.float64)
    for (start, _), weight in zip(spans, weights):
        total[start * scale:start * scale + len(weight)] += weight
    return [(w / total[s * scale:s * scale + len(w)]).float() for (s, _), w in zip(spans, weights)]


class ImageGroupNorms:
    """Every GroupNorm of ``module`` normalising with statistics of the whole image instead of the
    tile it is run on: ``gathering(weight)`` around each tile's first run adds up the inputs'
    sums weighted by the tile's blend weight (resized to each layer's resolution), then
    ``applying()`` around the second runs normalises with them."""

    def __init__(self, module):
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.sums = {}      # norm -> float64 [3, B, G]: weight, weighted sum, weighted sum of squares

    @contextmanager
    def gathering(self, weight):
        hooks = [norm.register_forward_pre_hook(functools.partial(self._gather, weight=weight))
                 for norm in self.norms]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _gather(self, norm, args, weight):
        x = args[0]
        b, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            weight = F.interpolate(weight[None, None].to(x.device), size=(h, w), mode="area")[0, 0]
            first, second = [], []
            for chunk in x.split(max(1, c // 8), dim=1):  # float32 copies of an eighth at a time
                chunk = chunk.float()
                first.append(torch.einsum("bchw,hw->bc", chunk, weight))
                second.append(torch.einsum("bchw,hw->bc", chunk * chunk, weight))
        per_group = c // norm.num_groups
        sums = torch.stack([torch.cat(first, 1), torch.cat(second, 1)]).double()
        sums = sums.reshape(2, b, norm.num_groups, per_group).sum(-1)      # [2, B, G]
        count = (weight.double().sum() * per_group).expand(1, b, norm.num_groups)
        total = torch.cat([count, sums])
        self.sums[norm] = total if norm not in self.sums else self.sums[norm] + total

    @contextmanager
    def applying(self):
        gathered = [norm for norm in self.norms if norm in self.sums]
        for norm in gathered:
            norm.forward = functools.partial(_normalise, *self._scale_shift(norm))
        try:
            yield
        finally:
            for norm in gathered:
                del norm.forward

    def _scale_shift(self, norm):
        """Per-(sample, channel) scale and shift [B, C, 1, 1] that the whole image's statistics give."""
        count, first, second = self.sums[norm]
        mean = first / count
        rstd = torch.rsqrt((second / count - mean * mean).clamp_min(0.0) + norm.eps)
        per_group = norm.num_channels // norm.num_groups
        scale = rstd.repeat_interleave(per_group, 1).float()
        shift = -mean.repeat_interleave(per_group, 1).float() * scale
        if norm.affine:
            scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
        return scale[..., None, None], shift[..., None, None]


def _normalise(scale, shift, x):
    return torch.addcmul(shift.to(x.device, x.dtype), x, scale.to(x.device, x.dtype))


@dataclass(frozen=True)
class _Tile:
    source: tuple            # (rows, cols) slices of the input
    target: tuple            # (rows, cols) slices of the output
    weight: torch.Tensor     # [h, w] blend weight at output resolution


def _tiles(height, width, tiling, factor, decoding):
    """The tiles over a latent of ``height`` x ``width``, for the decoder (image output, ``factor``
    times larger) or the encoder (image input, latent output)."""
    tile, overlap = tiling.in_latent(factor)
    in_scale, out_scale = (1, factor) if decoding else (factor, 1)
    rows, cols = tile_spans(height, tile, overlap), tile_spans(width, tile, overlap)
    row_weights, col_weights = blend_weights(rows, out_scale), blend_weights(cols, out_scale)
    return [_Tile((slice(y0 * in_scale, y1 * in_scale), slice(x0 * in_scale, x1 * in_scale)),
                  (slice(y0 * out_scale, y1 * out_scale), slice(x0 * out_scale, x1 * out_scale)),
                  row_weight[:, None] * col_weight[None, :])
                  for (y0, y1), row_weight in zip(rows, row_weights)
                  for (x0, x1), col_weight in zip(cols, col_weights)]


def _preview_shrink(inputs, tiles):
    """The integer factor that shrinks ``inputs`` [B, C, H, W] to at most one tile's size."""
    rows, cols = tiles[0].source
    return max(math.ceil(inputs.shape[-2] / (rows.stop - rows.start)),
               math.ceil(inputs.shape[-1] / (cols.stop - cols.start)))


def _run_tiles(run, inputs, tiles, size, norms=None, preview=False):
    """``run`` on every tile of ``inputs`` [B, C, H, W], blended into one [B, C', *size] tensor
    (accumulated in float32, returned in the dtype ``run`` gives); with ``norms`` (an
    :class:`ImageGroupNorms`), a first pass gathers their statistics: over every tile, or with
    ``preview`` in one run on ``inputs`` shrunk to fit a tile."""
    if norms is not None and preview:
        shrink = _preview_shrink(inputs, tiles)
        small = inputs[..., ::shrink, ::shrink]     # every shrink-th position: the values keep their spread
        with norms.gathering(torch.ones(1, 1)):     # every position of the preview counts once
            run(small)
    elif norms is not None:
        for tile in tiles:
            with norms.gathering(tile.weight):
                run(inputs[(..., *tile.source)])
    out = part = None
    with norms.applying() if norms is not None else nullcontext():
        for tile in tiles:
            part = run(inputs[(..., *tile.source)])
            if out is None:
                out = part.new_zeros((*part.shape[:2], *size), dtype=torch.float32)
            out[(..., *tile.target)] += part.float() * tile.weight.to(part.device)
    return out.to(part.dtype)


def tiled_decode(autoencoder, z, tiling=Tiling()):
    """``autoencoder.decode(z)`` with the image-resolution levels run tile by tile; the plain decode
    when one tile covers ``z``."""
    f = latent_factor(autoencoder)
    if max(z.shape[-2:]) <= tiling.tile // f:
        return autoencoder.decode(z)
    decoder = autoencoder.decoder
    features = decoder.to_features(autoencoder.post_quant_conv(z))   # whole latent: exact attention
    tiles = _tiles(*z.shape[-2:], tiling, f, decoding=True)
    norms = ImageGroupNorms(decoder) if tiling.image_norms else None
    return _run_tiles(decoder.from_features, features, tiles, (z.shape[-2] * f, z.shape[-1] * f), norms,
                      tiling.preview_norms)


def tiled_encode(autoencoder, x, tiling=Tiling()):
    """``autoencoder.encode(x)`` with the image-resolution levels run tile by tile; the plain encode
    when one tile covers ``x`` or its sides are not multiples of the latent factor."""
    f = latent_factor(autoencoder)
    height, width = x.shape[-2:]
    if max(height, width) <= tiling.tile or height % f or width % f:
        return autoencoder.encode(x)
    encoder = autoencoder.encoder
    tiles = _tiles(height // f, width // f, tiling, f, decoding=False)
    norms = ImageGroupNorms(encoder) if tiling.image_norms else None
    features = _run_tiles(encoder.to_features, x, tiles, (height // f, width // f), norms, tiling.preview_norms)
    return DiagonalGaussianDistribution(autoencoder.quant_conv(encoder.from_features(features)))


def decode(autoencoder, z, mode="off", tiling=Tiling(), channels_last=False):
    """Decode ``z`` tiled or not, as ``mode`` says for its image size. ``channels_last``: run the
    convolutions in that layout (oneDNN takes it from the input and reorders the weights per call,
    so the weights keep theirs): a 512px SD decode takes 0.87x the time in float32, 0.45x in
    bfloat16 (bench/README.md), at float32 rounding-order differences (max abs 6e-5)."""
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    f = latent_factor(autoencoder) if can_tile(autoencoder) else 1
    if can_tile(autoencoder) and tiles_image(mode, z.shape[-2] * f, z.shape[-1] * f):
        x = tiled_decode(autoencoder, z, tiling)
    else:
        x = autoencoder.decode(z)
    return x.contiguous() if channels_last else x


def encode(autoencoder, x, mode="off", tiling=Tiling(), channels_last=False):
    """Encode ``x`` tiled or not, as ``mode`` says for its image size; ``channels_last`` as in
    :func:`decode`."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if can_tile(autoencoder) and tiles_image(mode, x.shape[-2], x.shape[-1]):
        posterior = tiled_encode(autoencoder, x, tiling)
    else:
        posterior = autoencoder.encode(x)
    if channels_last and isinstance(posterior, DiagonalGaussianDistribution):
        return DiagonalGaussianDistribution(posterior.parameters.contiguous())
    return posterior


@contextmanager
def first_stage_settings(model, tiling, channels_last, stats="image"):
    """Set ``model.first_stage_tiling``, ``first_stage_tiling_stats`` and ``first_stage_channels_last``
    (read by LatentDiffusion's decode/encode_first_stage) for a block; a model without them is left as
    it is."""
    check_mode(tiling)
    check_stats(stats)
    if not hasattr(model, "first_stage_tiling"):
        yield model
        return
    previous = model.first_stage_tiling, model.first_stage_tiling_stats, model.first_stage_channels_last
    model.first_stage_tiling, model.first_stage_tiling_stats, model.first_stage_channels_last = \
        tiling, stats, channels_last
    try:
        yield model
    finally:
        model.first_stage_tiling, model.first_stage_tiling_stats, model.first_stage_channels_last = previous
