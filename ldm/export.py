"""Turn a training checkpoint into an inference checkpoint (safetensors).

With ``use_ema`` the EMA weights replace the trained ones: ``model_ema.<name without dots>`` is copied
into ``model.<name>`` (diffusion models keep their EMA over ``model``) or into ``<name>`` (an
autoencoder keeps it over itself). ``model_ema.*``, the training-only loss (``loss.*``: discriminator,
LPIPS) and everything that is not a tensor (optimizer and loop states) are left out.

The file's metadata names the source checkpoint and its sha256, so an exported model can be traced
back to the training run that made it.
"""
import logging
import os
from pathlib import Path

import torch

from ldm.errors import UserError

logger = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
DROPPED_PREFIXES = (EMA_PREFIX, "loss.")
EMA_BOOKKEEPING = ("decay", "num_updates")


def ema_source_key(key, ema_keys):
    """The ``model_ema.*`` key holding the average of ``key``, or None."""
    candidates = []
    if key.startswith("model."):
        candidates.append(EMA_PREFIX + key[len("model."):].replace(".", ""))
    candidates.append(EMA_PREFIX + key.replace(".", ""))
    return next((c for c in candidates if c in ema_keys), None)


def apply_ema(sd):
    """Copy EMA weights over their parameters in ``sd`` (in place); returns how many were copied."""
    ema_keys = {k for k in sd if k.startswith(EMA_PREFIX)}
    used = set()
    for key in list(sd):
        if key.startswith(EMA_PREFIX):
            continue
        source = ema_source_key(key, ema_keys)
        if source is not None:
            if sd[source].shape != sd[key].shape:
                raise UserError(f"EMA tensor {source} has shape {tuple(sd[source].shape)} but {key} has "
                                f"{tuple(sd[key].shape)}; the checkpoint is inconsistent")
            sd[key] = sd[source]
            used.add(source)
    unused = sorted(ema_keys - used - {EMA_PREFIX + name for name in EMA_BOOKKEEPING})
    if unused:
        raise UserError(f"{len(unused)} EMA tensors match no weight (e.g. {unused[0]}); export with use_ema=False")
    return len(used)


def _umask():
    # Python can only read the umask by setting it; put it straight back.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def export_weights(ckpt_path, out_path, use_ema=True, half=False, overwrite=False, only_prefix=None):
    """Write the inference weights of ``ckpt_path`` to ``out_path`` (.safetensors); returns a summary dict.

    ``use_ema`` copies EMA weights in when the checkpoint has them (it is not an error if it has none);
    ``half`` stores floating-point tensors as float16, otherwise float32. An existing ``out_path`` is
    refused, and left as it is, unless ``overwrite``. ``only_prefix`` keeps only the tensors whose
    names start with it (``control_model.``: a ControlNet-only file, as the released extracts are).
    """
    from safetensors.torch import save_file

    from ldm.checkpoint import file_hash, read_state_dict
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise UserError(f"export target '{out_path}' must end in .safetensors")
    if out_path.exists() and not overwrite:
        raise UserError(f"export target '{out_path}' already exists; pass overwrite=True to replace it")
    sd = dict(read_state_dict(ckpt_path))
    has_ema = any(k.startswith(EMA_PREFIX) for k in sd)
    copied = apply_ema(sd) if use_ema and has_ema else 0
    dtype = torch.float16 if half else torch.float32
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
           for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES) and k.startswith(only_prefix or "")}
    if not out:
        raise UserError(f"checkpoint '{ckpt_path}' has no tensors named {only_prefix}*; nothing to export")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "source": Path(ckpt_path).name, "source_sha256": file_hash(ckpt_path, length=64),
                "ema": str(bool(copied)).lower(), "dtype": str(dtype).replace("torch.", "")}
    save_file(out, str(out_path), metadata=metadata)
    # safetensors writes a private temporary file (mode 0600) and renames it; an exported model is
    # meant to be shared, so give it the permissions of any new file.
    os.chmod(out_path, 0o666 & ~_umask())
    summary = {"tensors": len(out), "ema_copied": copied, "dropped": len(sd) - len(out), "dtype": metadata["dtype"],
               "path": str(out_path)}
    logger.info("exported %(tensors)d tensors (%(ema_copied)d from EMA, %(dropped)d dropped) as %(dtype)s "
                "to %(path)s", summary)
    return summary
