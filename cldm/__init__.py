"""ControlNet (Zhang et al. 2023) at the import path of lllyasviel/ControlNet: ``cldm.cldm``.

    cldm.py      ControlLDM, ControlNet, ControlledUnetModel (the classes its configs name)
    loading.py   full-model checkpoints, and control-only files attached to an SD base checkpoint
"""
