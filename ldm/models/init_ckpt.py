"""``ckpt_path`` in a model config: load weights while the model is being built (training use)."""
import logging

logger = logging.getLogger(__name__)


def init_from_ckpt(model, path, ignore_keys=(), only_model=False):
    """Non-strict load of ``path`` into ``model`` (or its ``model`` sub-module), dropping keys that start
    with any of ``ignore_keys``; reports what did not match."""
    from ldm.checkpoint import read_state_dict
    sd = read_state_dict(path)
    for k in list(sd):
        if any(k.startswith(prefix) for prefix in ignore_keys):
            logger.info("deleting key %s from the state dict", k)
            del sd[k]
    target = model.model if only_model else model
    missing, unexpected = target.load_state_dict(sd, strict=False)
    logger.info("restored from %s with %d missing and %d unexpected keys", path, len(missing), len(unexpected))
    if missing:
        logger.info("missing keys: %s", missing[:20])
    if unexpected:
        logger.info("unexpected keys: %s", unexpected[:20])
    return missing, unexpected
