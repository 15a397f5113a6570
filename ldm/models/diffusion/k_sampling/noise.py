"""Noise sources of the stochastic samplers: ``noise(sigma, sigma_next)`` -> N(0, I) shaped like x.

``GaussianNoise`` draws fresh noise per call from torch's global generator (the ancestral samplers).
``BrownianTreeNoise`` returns the normalised increment (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|
of ONE Brownian path W fixed by a seed, so an SDE sampler sees the same path whatever its steps:
the noise over a coarse step is exactly the sum of the noises of the fine steps it covers. That is
what makes "one seed, one image" hold for the SDE samplers across step counts (the role of
torchsde's BrownianTree in k-diffusion; this is an independent implementation).
"""
import math

import torch

_MASK64 = (1 << 64) - 1


def draw_seed():
    """A 63-bit seed from torch's global generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2 ** 63 - 1, ()).item())


class GaussianNoise:
    """Fresh N(0, I) noise shaped like ``x`` at every call, from the global generator of x's device."""

    def __init__(self, x):
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.shape, dtype=self.dtype, device=self.device)


def _node_seed(seed, node):
    """A well-mixed 64-bit seed for tree node ``node`` (SplitMix64 finaliser over seed + node * golden ratio),
    so that neighbouring nodes of neighbouring seeds get unrelated streams."""
    z = (seed + node * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class BrownianTreeNoise:
    """Increments of a seeded Brownian motion W on [sigma_min, sigma_max], shaped like ``x``.

    W(sigma_min) = 0 and W(sigma_max) ~ N(0, sigma_max - sigma_min). W at any other time is found
    by bisection: each midpoint of [lo, hi] is drawn from the Brownian bridge
    N((W(lo) + W(hi)) / 2, (hi - lo) / 4) with the noise of its own tree node (a generator seeded
    from ``seed`` and the node's heap index), so W(t) is a fixed function of (seed, t). Below an
    interval of ``tol`` W is linear, which only matters for steps shorter than ``tol``.
    The normals are drawn on the CPU in float32, so a seed gives the same path on every device.
    """

    def __init__(self, x, sigma_min, sigma_max, seed, tol=1e-6):
        self.t0, self.t1 = float(sigma_min), float(sigma_max)
        if not 0 <= self.t0 < self.t1:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {self.t0}, {self.t1}")
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.seed = int(seed) & _MASK64
        self.tol = tol
        self.w_t1 = math.sqrt(self.t1 - self.t0) * self._normal(0)
        self._cache = {}  # the last few W(t): consecutive steps share their endpoints

    def _normal(self, node):
        generator = torch.Generator().manual_seed(_node_seed(self.seed, node))
        return torch.randn(self.shape, generator=generator, dtype=torch.float32)

    def w(self, t):
        """W(t) for a float ``t`` (clamped to [sigma_min, sigma_max]) as a float32 CPU tensor."""
        t = min(max(float(t), self.t0), self.t1)
        if t in self._cache:
            return self._cache[t]
        lo, hi = self.t0, self.t1
        w_lo, w_hi = torch.zeros(self.shape), self.w_t1
        node = 1  # heap index: the children of node k are 2k (left half) and 2k + 1 (right half)
        while t not in (lo, hi) and hi - lo > self.tol:
            mid = 0.5 * (lo + hi)
            w_mid = 0.5 * (w_lo + w_hi) + 0.5 * math.sqrt(hi - lo) * self._normal(node)
            if t < mid:
                hi, w_hi, node = mid, w_mid, 2 * node
            else:
                lo, w_lo, node = mid, w_mid, 2 * node + 1
        if t == lo:
            value = w_lo
        elif t == hi:
            value = w_hi
        else:
            value = w_lo + (t - lo) / (hi - lo) * (w_hi - w_lo)
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[t] = value
        return value

    def __call__(self, sigma, sigma_next):
        """(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|: N(0, I), shaped and placed like x."""
        s, s_next = float(sigma), float(sigma_next)
        increment = self.w(s_next) - self.w(s)
        return (increment / math.sqrt(abs(s_next - s))).to(device=self.device, dtype=self.dtype)
