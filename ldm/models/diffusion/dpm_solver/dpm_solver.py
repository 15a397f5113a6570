"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) multistep, data-prediction form, orders 1 and 2.

Notation (continuous time t in (0, 1], discrete models mapped by t_model = 1000 * (t - 1/N)):

    ========== =====================================================
    alpha_t    sqrt(alpha_bar) interpolated from the discrete table
    sigma_t    sqrt(1 - alpha_t^2)
    lambda_t   log(alpha_t / sigma_t), the half log-SNR
    h          lambda_t - lambda_s, the step in log-SNR
    x0_hat     the model's data prediction at (x, t)
    ========== =====================================================
"""
import torch


def interpolate(x, xp, fp):
    """Piecewise-linear interpolation of ``fp`` over increasing ``xp``, extrapolating linearly at both ends."""
    k = xp.shape[0]
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, k - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseScheduleVP:
    """The variance-preserving schedule of a discrete-time model, made continuous by interpolating log(alpha_t)."""

    def __init__(self, schedule="discrete", alphas_cumprod=None):
        if schedule != "discrete":
            raise NotImplementedError("only discrete-time (DDPM-trained) schedules are supported")
        self.schedule = schedule
        log_alphas = 0.5 * torch.log(alphas_cumprod.float())
        self.total_N = len(log_alphas)
        self.T = 1.
        self.t_array = torch.linspace(0., 1., self.total_N + 1)[1:].to(log_alphas.device)
        self.log_alpha_array = log_alphas

    def marginal_log_mean_coeff(self, t):
        return interpolate(t, self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
        return log_mean_coeff - log_std

    def model_time(self, t):
        """Continuous t -> the (fractional) discrete timestep the network was trained on."""
        return (t - 1. / self.total_N) * 1000.


def _bcast(v, x):
    return v.reshape(-1, *((1,) * (x.ndim - 1)))


class DPMSolverPP:
    """Multistep DPM-Solver++ with time-uniform steps and lower order on the final steps.

    ``data_fn(x, t_model, alpha_t, sigma_t)`` returns x0_hat; the sampler builds it from the shared
    guided model call.
    """

    def __init__(self, data_fn, noise_schedule):
        self.data_fn = data_fn
        self.ns = noise_schedule

    def model_fn(self, x, t):
        t = t.expand(x.shape[0])
        return self.data_fn(x, self.ns.model_time(t), self.ns.marginal_alpha(t), self.ns.marginal_std(t))

    def first_order_update(self, x, s, t, x0_s):
        """DPM-Solver++(1), i.e. DDIM: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s."""
        ns = self.ns
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        alpha_t = ns.marginal_alpha(t)
        ratio = ns.marginal_std(t) / ns.marginal_std(s)
        return _bcast(ratio, x) * x - _bcast(alpha_t * torch.expm1(-h), x) * x0_s

    def second_order_update(self, x, x0_list, t_list, t):
        """Multistep DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with D1 = (x0_0 - x0_1) / r0."""
        ns = self.ns
        x0_prev_1, x0_prev_0 = x0_list
        t_prev_1, t_prev_0 = t_list
        lambda_prev_1, lambda_prev_0, lambda_t = (ns.marginal_lambda(v) for v in (t_prev_1, t_prev_0, t))
        alpha_t = ns.marginal_alpha(t)
        h_0 = lambda_prev_0 - lambda_prev_1
        h = lambda_t - lambda_prev_0
        r0 = h_0 / h
        d1 = _bcast(1. / r0, x) * (x0_prev_0 - x0_prev_1)
        phi = _bcast(alpha_t * (torch.exp(-h) - 1.), x)
        return _bcast(ns.marginal_std(t) / ns.marginal_std(t_prev_0), x) * x - phi * x0_prev_0 - 0.5 * phi * d1

    def time_grid(self, steps, device=None):
        """The ``steps + 1`` times of a full run: uniform from T (the last training timestep) to 1/N."""
        return torch.linspace(self.ns.T, 1. / self.ns.total_N, steps + 1, device=device)

    def sample(self, x, steps, order=2, lower_order_final=True, callback=None, progress_iter=None, t_start=None):
        """``steps`` steps from ``x`` at time ``t_start`` (default T) to 1/N, uniform in time. The
        warm-up makes the first step first order, so one step is enough."""
        timesteps = self.time_grid(steps, x.device)
        if t_start is not None:
            timesteps = torch.linspace(float(t_start), float(timesteps[-1]), steps + 1, device=x.device)
        steps_iter = progress_iter(range(1, steps + 1)) if progress_iter else range(1, steps + 1)
        t_list = [timesteps[0].expand(1)]
        x0_list = [self.model_fn(x, timesteps[0])]
        for step in steps_iter:
            t = timesteps[step].expand(1)
            # warm-up steps have less history; the last steps drop order for stability when steps < 15
            step_order = min(order, step)
            if lower_order_final and steps < 15:
                step_order = min(step_order, steps + 1 - step)
            if step_order == 1:
                x = self.first_order_update(x, t_list[-1], t, x0_list[-1])
            else:
                x = self.second_order_update(x, x0_list[-2:], t_list[-2:], t)
            t_list = (t_list + [t])[-order:]
            if step < steps:  # the final model value is never used
                x0_list = (x0_list + [self.model_fn(x, t)])[-order:]
            if callback:
                callback(step - 1)
        return x
