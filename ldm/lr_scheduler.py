"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR`` (called once per optimizer step).

``schedule(n)`` returns the factor applied to the base learning rate at step ``n``; the classes are
named and parameterised as in the official configs (``scheduler_config`` of a model).

The ``*2`` / ``Linear`` variants run one warm-up + decay cycle per entry of ``cycle_lengths``;
steps past the last cycle keep its final value (the official code fails there).
"""
import logging
import math

import numpy as np

from ldm.errors import UserError

logger = logging.getLogger(__name__)


def _plain_list(name, values):
    # OmegaConf ListConfig would end up in the checkpoint via LambdaLR.state_dict: keep plain floats
    try:
        return [float(v) for v in values]
    except TypeError:
        raise UserError(f"lr scheduler: {name} must be a list with one value per cycle, got {values!r}") from None


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max``, then cosine decay to ``lr_min`` at ``max_decay_steps``."""

    def __init__(self, warm_up_steps, lr_min, lr_max, lr_start, max_decay_steps, verbosity_interval=0):
        self.lr_warm_up_steps = int(warm_up_steps)
        self.lr_start = float(lr_start)
        self.lr_min = float(lr_min)
        self.lr_max = float(lr_max)
        self.lr_max_decay_steps = int(max_decay_steps)
        if self.lr_max_decay_steps <= self.lr_warm_up_steps:
            raise UserError(f"lr scheduler: max_decay_steps ({max_decay_steps}) must exceed "
                            f"warm_up_steps ({warm_up_steps})")
        self.last_lr = 0.
        self.verbosity_interval = int(verbosity_interval)

    def schedule(self, n, **kwargs):
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %g", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))
        self.last_lr = lr
        return lr

    def __call__(self, n, **kwargs):
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, each a linear warm-up from ``f_start`` to ``f_max`` over ``warm_up_steps`` and a
    cosine decay to ``f_min`` at the end of the cycle. Every argument is a list with one entry per cycle.
    The values are multipliers: use with ``base_learning_rate`` set to the peak rate."""

    def __init__(self, warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval=0):
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start,
                 "cycle_lengths": cycle_lengths}
        lists = {name: _plain_list(name, values) for name, values in lists.items()}
        lengths = {name: len(values) for name, values in lists.items()}
        if len(set(lengths.values())) != 1 or not lengths["cycle_lengths"]:
            raise UserError(f"lr scheduler: warm_up_steps, f_min, f_max, f_start and cycle_lengths need the same "
                            f"number (>= 1) of entries, got {lengths}")
        self.lr_warm_up_steps = lists["warm_up_steps"]
        self.f_start = lists["f_start"]
        self.f_min = lists["f_min"]
        self.f_max = lists["f_max"]
        self.cycle_lengths = lists["cycle_lengths"]
        self.cum_cycles = [float(c) for c in np.cumsum([0] + self.cycle_lengths)]
        self.last_f = 0.
        self.verbosity_interval = int(verbosity_interval)

    def find_in_interval(self, n):
        """Index of the cycle that step ``n`` falls in (a cycle includes its end step)."""
        for interval, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return interval
        return len(self.cycle_lengths) - 1

    def _position(self, n):
        cycle = self.find_in_interval(n)
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %g, current cycle %d", n, self.last_f, cycle)
        return cycle, min(n - self.cum_cycles[cycle], self.cycle_lengths[cycle])

    def _warm_up(self, cycle, n):
        return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]

    def schedule(self, n, **kwargs):
        cycle, n = self._position(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            t = (n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle])
            t = min(t, 1.0)
            f = self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + math.cos(t * math.pi))
        self.last_f = f
        return f

    def __call__(self, n, **kwargs):
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Like ``LambdaWarmUpCosineScheduler2`` but after warm-up the factor falls linearly from ``f_max`` towards
    ``f_min`` over the cycle. The SD configs use one endless cycle with ``f_max = f_min = 1``: a plain warm-up."""

    def schedule(self, n, **kwargs):
        cycle, n = self._position(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            length = self.cycle_lengths[cycle]
            f = self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
        self.last_f = f
        return f
