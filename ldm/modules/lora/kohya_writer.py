"""Writing LoRA files as kohya sd-scripts writes them (``networks/lora.py`` ``save_weights``).

A file is one safetensors: per adapted layer ``<name>.lora_down.weight`` (``[rank, in]``, a conv's
``[rank, in, kh, kw]``), ``<name>.lora_up.weight`` (``[out, rank]``, a conv's ``[out, rank, 1, 1]``) and
``<name>.alpha`` (a 0-d tensor), every tensor in the save precision, alpha included. The header's metadata
holds strings only: kohya's ``ss_*`` training fields, ``modelspec.*`` (Stability AI's ModelSpec, which kohya
adds to every save) and the two hashes kohya precomputes so that the webui's extensions need not read the
file: ``sshs_model_hash`` (sha256 of the bytes after the header, the "addnet" hash A1111 reads) and
``sshs_legacy_hash`` (sha256 of the 64 KiB at offset 1 MiB, 8 hex digits). Both are computed, as kohya
does, on the file serialized with its ``ss_*`` metadata alone.
"""
import datetime
import hashlib
import os
from pathlib import Path

import torch

from ldm.errors import UserError

NETWORK_MODULE = "networks.lora"
LORA_ROLES = ("lora_down.weight", "lora_up.weight", "alpha")
SAVE_PRECISIONS = {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODELSPEC_VERSION = "1.0.0"
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000  # the old A1111 / addnet "model hash" reads these bytes


def save_precision_dtype(name):
    if name not in SAVE_PRECISIONS:
        raise UserError(f"save_precision must be one of {', '.join(SAVE_PRECISIONS)} (kohya's names), got {name!r}")
    return SAVE_PRECISIONS[name]


def base_model_version(v2, v_parameterization):
    """kohya's ``ss_base_model_version`` for SD 1.x / 2.x: sd_v1, sd_v2, with "_v" for v-prediction."""
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def modelspec_metadata(v2, v_parameterization, title, resolution, timestamp):
    """The ``modelspec.*`` fields kohya writes into an SD 1.x / 2.x LoRA; ``resolution`` is (width, height),
    None for the architecture's own (768 for SD 2.x v-models, else 512), as kohya fills it in."""
    architecture = ("stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512") if v2 \
        else "stable-diffusion-v1"
    if resolution is None:
        resolution = (768, 768) if v2 and v_parameterization else (512, 512)
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }


def legacy_model_hash(path):
    """A1111's old 8-digit model hash of a checkpoint (kohya's ``ss_sd_model_hash``)."""
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]


def addnet_hashes(tensors, metadata):
    """(``sshs_model_hash``, ``sshs_legacy_hash``) of ``tensors`` as kohya precomputes them: the file
    serialized with the ``ss_*`` entries of ``metadata`` only (editing other metadata keeps the hashes)."""
    from safetensors.torch import save
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    return (hashlib.sha256(data[header_end:]).hexdigest(),
            hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8])


def kohya_tensors(layers, dtype=torch.float32):
    """``{<name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha: tensor}`` on the CPU in ``dtype``
    from ``layers`` = ``{kohya layer name: {role: tensor}}`` with the roles of :data:`LORA_ROLES`."""
    tensors = {}
    for name, roles in layers.items():
        if set(roles) != set(LORA_ROLES):
            raise ValueError(f"LoRA layer {name} has {sorted(roles)}, not {list(LORA_ROLES)}")
        for role in LORA_ROLES:
            tensors[f"{name}.{role}"] = roles[role].detach().to("cpu", dtype).contiguous()
    return tensors


def save_kohya_lora(path, layers, metadata, dtype=torch.float32):
    """Write ``layers`` (see :func:`kohya_tensors`) to ``path`` with ``metadata`` (values made strings, as
    kohya does) and the two precomputed hashes. Written to a temporary file first, so a reader never sees a
    half-written LoRA."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = kohya_tensors(layers, dtype)
    metadata = {key: str(value) for key, value in metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path
