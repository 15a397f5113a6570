"""What a checkpoint file says about how its model was trained, beyond its weights.

Two community conventions, read by ``ldm.checkpoint.load_model``:

- Marker keys: empty tensors named ``v_pred`` (the model predicts v) and ``ztsnr`` (it was
  trained with a zero-terminal-SNR schedule, Lin et al. 2023) at the top level of the state dict,
  as A1111, ComfyUI and Forge read them. They override the config: a marked checkpoint is built
  with ``parameterization: v`` / ``rescale_betas_zero_snr: True`` whatever the config says, with
  a warning when the config said otherwise (a generic config such as v1-inference.yaml cannot
  know). The markers are never loaded as weights.
- A config beside the checkpoint: ``<checkpoint stem>.yaml`` in the same folder (the older A1111
  convention) is the checkpoint's config when none is given. It is as untrusted as any config
  (``ldm.config_safety``).

A zero-terminal-SNR model recomputes its schedule buffers from its config: the ones in a
checkpoint usually come from the base model's ordinary schedule, so loaders keep the model's own
(:func:`derived_schedule_keys`).
"""
import logging
from pathlib import Path

from ldm.errors import UserError
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS

log = logging.getLogger(__name__)

V_PREDICTION_KEY = "v_pred"
ZERO_TERMINAL_SNR_KEY = "ztsnr"
MARKER_KEYS = (V_PREDICTION_KEY, ZERO_TERMINAL_SNR_KEY)


def sibling_config(ckpt_path):
    """``<stem>.yaml`` beside the checkpoint ``ckpt_path`` if that file exists, else None."""
    candidate = Path(ckpt_path).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def apply_markers(config, sd, config_name):
    """Set ``config.model.params`` from the marker keys of the state dict ``sd``; says what changed.

    ``config_name`` names the config in messages. A ``ztsnr`` marker on a model that would predict
    eps is refused: zero terminal SNR needs v-prediction (see ``DDPM``).
    """
    marks_v = V_PREDICTION_KEY in sd
    marks_zero_snr = ZERO_TERMINAL_SNR_KEY in sd
    if not (marks_v or marks_zero_snr):
        return config
    if config.model.get("params") is None:
        config.model.params = {}
    params = config.model.params
    if marks_v:
        _set(params, "parameterization", "v", "eps", f"v-prediction ({V_PREDICTION_KEY} key)", config_name)
    if marks_zero_snr:
        if params.get("parameterization", "eps") == "eps":
            raise UserError(f"checkpoint marks zero terminal SNR ({ZERO_TERMINAL_SNR_KEY} key) but not "
                            f"v-prediction, and config '{config_name}' says parameterization eps: zero "
                            f"terminal SNR needs a v-prediction model; give a config with "
                            f"parameterization: v if the model predicts v")
        _set(params, "rescale_betas_zero_snr", True, False,
             f"zero terminal SNR ({ZERO_TERMINAL_SNR_KEY} key)", config_name)
    return config


def _set(params, name, value, default, what, config_name):
    current = params.get(name, default)
    if current == value:
        log.info("checkpoint marks %s; config '%s' agrees", what, config_name)
        return
    log.warning("checkpoint marks %s: using %s %s (config '%s' says %s)", what, name, value, config_name, current)
    params[name] = value


def derived_schedule_keys(model):
    """Checkpoint keys that ``model`` keeps its own values for: the schedule buffers of a
    zero-terminal-SNR model (those in the file are usually the base model's ordinary schedule)."""
    if getattr(model, "rescale_betas_zero_snr", False):
        return frozenset(SCHEDULE_BUFFERS)
    return frozenset()
