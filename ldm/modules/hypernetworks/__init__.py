"""Hypernetworks: A1111's ``.pt`` hypernetworks, which transform the context of every attention layer before its
key and value projections.

``network`` builds the per-width MLPs, ``files`` reads A1111's files into them, ``apply`` attaches them to a model's
attention layers and removes them exactly.
"""
from ldm.modules.hypernetworks.apply import (
                                             ContextHook,
                                             HypernetworkHooks,
                                             HypernetworkUse,
                                             attention_layers,
                                             hypernetwork_use,
)
from ldm.modules.hypernetworks.files import (
                                             HYPERNETWORK_SUFFIX,
                                             Hypernetwork,
                                             find_hypernetwork_file,
                                             hypernetwork_from_data,
                                             read_hypernetwork_file,
)
from ldm.modules.hypernetworks.network import (
                                             ACTIVATIONS,
                                             HypernetworkModule,
                                             default_dropout_structure,
)

__all__ = ["ACTIVATIONS", "HYPERNETWORK_SUFFIX", "ContextHook", "Hypernetwork", "HypernetworkHooks",
           "HypernetworkModule", "HypernetworkUse", "attention_layers", "default_dropout_structure",
           "find_hypernetwork_file", "hypernetwork_from_data", "hypernetwork_use", "read_hypernetwork_file"]
