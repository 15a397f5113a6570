"""Write the starting checkpoint of a ControlNet training: an SD checkpoint with a ControlNet added,
its encoder copied from the U-Net's and its zero convolutions at zero (lllyasviel/ControlNet's
tool_add_control.py).

    python scripts/tool_add_control.py v1-5-pruned.ckpt models/control_sd15_ini.ckpt
    python scripts/tool_add_control.py v2-1_512-ema-pruned.ckpt control_sd21_ini.ckpt \
        --config configs/controlnet/cldm_v21.yaml

Train from it with main.py and a ControlNet config: model.params.ckpt_path=<the file written>.
"""
import argparse
import sys

from ldm.cli import ArgumentParser, existing_file, run, setup_logging


def _main(argv):
    from cldm.training import write_control_init
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=existing_file("base checkpoint"), help="the SD checkpoint (.ckpt/.safetensors)")
    parser.add_argument("out", help="the file to write (.ckpt or .safetensors)")
    parser.add_argument("--config", type=existing_file("config"), default="configs/controlnet/cldm_v15.yaml",
                        help="the ControlNet config (default: configs/controlnet/cldm_v15.yaml, SD 1.x)")
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--trust-config", action="store_true", help="build any target the config names")
    args = parser.parse_args(argv)
    setup_logging()
    copied, fresh = write_control_init(args.base, args.config, args.out, overwrite=args.force,
                                       trust_config=args.trust_config)
    print(f"wrote {args.out}: ControlNet with {copied} tensors copied from the U-Net, {fresh} new "
          f"(hint encoder, zero convolutions)")
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
