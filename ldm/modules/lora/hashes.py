"""The short hash A1111 writes for a LoRA in an image's ``Lora hashes`` field.

A1111 (``extensions-builtin/Lora/network.py``) takes the file's ``sshs_model_hash`` metadata when it has
one, else the "addnet" hash of a safetensors file (kohya's: sha256 of the bytes after the header, so
editing the metadata keeps the hash) or the sha256 of a whole other file, and keeps the first 12 hex digits.
"""
import hashlib
import json
from pathlib import Path

SHORT = 12
BLOCK = 1 << 20


def lora_short_hash(path):
    path = Path(path)
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            header_size = int.from_bytes(f.read(8), "little")
            header = _json_or_empty(f.read(header_size))
            recorded = header.get("__metadata__", {}).get("sshs_model_hash") if isinstance(header, dict) else None
            if isinstance(recorded, str) and recorded:
                return recorded[:SHORT]
        else:
            f.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()[:SHORT]


def _json_or_empty(data):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
