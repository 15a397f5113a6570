"""ControlNet (Zhang et al. 2023) at the import path of lllyasviel/ControlNet: ``cldm.cldm``.

    cldm.py        ControlLDM, ControlNet, ControlledUnetModel (the classes its configs name)
    loading.py     full-model checkpoints, control-only files attached to an SD base checkpoint,
                   further ControlNets beside a ControlLDM's own
    control.py     ControlNet inputs as conditioning (hints, weights, step ranges) for the guided call
    generate.py    sampling API: text to image steered by one or several ControlNets (ControlUnit)
    preprocess.py  hints from images: canny, scribble, threshold, MiDaS depth, or the image itself
    infotext.py    the units in PNG metadata, as sd-webui-controlnet writes them
    cli.py         the flags of scripts/controlnet.py
    training.py    training through main.py: hint batches, the locked U-Net, tool_add_control initialisation
"""
