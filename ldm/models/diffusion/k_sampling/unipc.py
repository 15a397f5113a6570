"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), multistep, data prediction, in the sigma formulation.

Notation as in ``samplers.py``; in addition, for a step from sigma_0 to sigma (h = log(sigma_0 / sigma))
with earlier estimates D_k at sigma_k:

========== ==================================================================================
r_k        (lambda_k - lambda_0) / h, the earlier points' offsets in units of h (negative)
D1_k       (D_k - D_0) / r_k, the scaled differences the predictor and corrector combine
B(h)       h (variant "bh1") or e^h - 1 ("bh2"), both with h -> -h for data prediction
phi_k      phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
rho        predictor / corrector weights: the order conditions
           sum_k rho_k r_k^(m-1) = m! h phi_{m+1}(h) / B(h), m = 1..p (R rho = b), with r = 1 for D(x_t)
========== ==================================================================================

UniP-p (the predictor) extrapolates with the p - 1 earlier D; UniC-p (the corrector) re-uses the
model's estimate at the predicted point, which also serves as D_0 of the next step, so the corrector
costs no extra model call. The final step takes no corrector (its estimate would be unused); the
step into sigma = 0 returns D. A first-order step is x_base = D_0 + (sigma / sigma_0)(x - D_0).
"""
import math

import numpy as np
from tqdm import trange

from .denoiser import set_step


def _order_conditions(h, offsets, order, variant):
    """(R, b, B_h) of the order conditions for data prediction: R[m, k] = r_k^m, b_m = (m + 1)! hh
    phi_{m+2}(hh) / B(hh) for m = 0..order-1, hh = -h."""
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r = np.asarray(list(offsets) + [1.0], dtype=np.float64)
    rows, b = [], []
    hh_phi = math.expm1(hh) / hh - 1  # hh * phi_2(hh)
    factorial = 1
    for m in range(1, order + 1):
        rows.append(r ** (m - 1))
        b.append(hh_phi * factorial / b_h)
        factorial *= m + 1
        hh_phi = hh_phi / hh - 1 / factorial  # hh * phi_{m+2}(hh)
    return np.stack(rows), np.asarray(b), b_h


def _unipc_step(denoiser, x, estimates, sigmas_prev, sigma, order, variant, use_corrector):
    """One UniP step (plus UniC when ``use_corrector``) of ``order`` from sigmas_prev[-1] to ``sigma``;
    returns (x, the estimate at the predicted point or None)."""
    sigma_0, d_0 = sigmas_prev[-1], estimates[-1]
    h = math.log(sigma_0 / sigma)
    offsets, d1s = [], []
    for k in range(1, order):
        r_k = math.log(sigma_0 / sigmas_prev[-(k + 1)]) / h
        offsets.append(r_k)
        d1s.append((estimates[-(k + 1)] - d_0) / r_k)
    rows, b, b_h = _order_conditions(h, offsets, order, variant)
    x_base = d_0 + (sigma / sigma_0) * (x - d_0)

    if d1s:
        # UniP-2 uses rho = 1/2 rather than its 1x1 solve, as the reference implementation does
        rhos_p = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1]).tolist()
        x_new = x_base - b_h * sum(rho * d1 for rho, d1 in zip(rhos_p, d1s))
    else:
        x_new = x_base
    if not use_corrector:
        return x_new, None

    estimate = denoiser(x_new, sigma)
    rhos_c = [0.5] if order == 1 else np.linalg.solve(rows, b).tolist()
    correction = rhos_c[-1] * (estimate - d_0)
    for rho, d1 in zip(rhos_c[:-1], d1s):
        correction = correction + rho * d1
    return x_base - b_h * correction, estimate


def _sample_unipc(denoiser, x, sigmas, variant, *, callback=None, progress=True, order=3, lower_order_final=True):
    sig = [float(s) for s in sigmas]
    n_steps = len(sig) - 1
    set_step(denoiser, 0)
    estimates, sigmas_prev = [denoiser(x, sig[0])], [sig[0]]
    for i in trange(n_steps, desc=f"UniPC ({variant})", disable=not progress):
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sig[i], "sigma_hat": sig[i], "denoised": estimates[-1]})
        if sig[i + 1] == 0:
            x = estimates[-1]
            continue
        step_order = min(order, len(estimates), n_steps - i if lower_order_final else order)
        last = i == n_steps - 1
        # the corrector's evaluation at sigma_{i+1} is the next step's estimate: it belongs to step i + 1
        set_step(denoiser, i + 1)
        x, estimate = _unipc_step(denoiser, x, estimates, sigmas_prev, sig[i + 1], step_order, variant,
                                  use_corrector=not last)
        if not last:
            estimates = (estimates + [estimate])[-order:]
            sigmas_prev = (sigmas_prev + [sig[i + 1]])[-order:]
    return x


def sample_unipc_bh1(denoiser, x, sigmas, *, callback=None, progress=True, order=3, lower_order_final=True):
    """UniPC with B(h) = h (Zhao et al. 2023, the "bh1" variant, A1111's default), order 3 multistep,
    lower order on the last steps; see the module docstring."""
    return _sample_unipc(denoiser, x, sigmas, "bh1", callback=callback, progress=progress, order=order,
                         lower_order_final=lower_order_final)


def sample_unipc_bh2(denoiser, x, sigmas, *, callback=None, progress=True, order=3, lower_order_final=True):
    """UniPC with B(h) = e^h - 1 (Zhao et al. 2023, the "bh2" variant, recommended for guided
    sampling with few steps); see the module docstring."""
    return _sample_unipc(denoiser, x, sigmas, "bh2", callback=callback, progress=progress, order=order,
                         lower_order_final=lower_order_final)
