"""LoRA: community LoRA / LoCon / LoHa / LoKr files merged into our models' weights, and removed exactly.

``names`` maps the layer names the files use onto our parameters, ``formats`` reads the files into
per-weight changes, ``apply`` merges and restores them.
"""
from ldm.modules.lora.apply import LoraMerger, LoraUse, lora_use
from ldm.modules.lora.formats import (SUPPORTED, LoraFile, ModuleDelta, find_lora_file, load_lora,
                                      lora_from_state_dict, read_lora_file)
from ldm.modules.lora.names import ModuleNames, Target

__all__ = ["SUPPORTED", "LoraFile", "LoraMerger", "LoraUse", "ModuleDelta", "ModuleNames", "Target",
           "find_lora_file", "load_lora", "lora_from_state_dict", "lora_use", "read_lora_file"]
