"""Export a training checkpoint as inference weights (safetensors, EMA weights by default).

    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt models/ldm/shapes/model.safetensors

    python scripts/export_weights.py --control-only logs/<controlnet run>/checkpoints/last.ckpt control.safetensors

An existing output file is left alone unless --force is given.
"""
import argparse
import sys
from pathlib import Path

from ldm.cli import ArgumentParser, run, setup_logging
from ldm.errors import UserError
from ldm.export import export_weights


def _main(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="training checkpoint (.ckpt) written by main.py")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--no-ema", action="store_true", help="keep the trained weights instead of their EMA")
    parser.add_argument("--half", action="store_true", help="store float16 instead of float32")
    parser.add_argument("--control-only", action="store_true",
                        help="only the ControlNet (control_model.*), as the released ControlNet extracts")
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)
    setup_logging()
    if Path(args.out).exists() and not args.force:
        raise UserError(f"'{args.out}' already exists; pass --force to replace it")
    summary = export_weights(args.ckpt, args.out, use_ema=not args.no_ema, half=args.half, overwrite=args.force,
                             only_prefix="control_model." if args.control_only else None)
    print(f"wrote {summary['path']}: {summary['tensors']} tensors ({summary['dtype']}), "
          f"{summary['ema_copied']} from EMA, {summary['dropped']} left out (training-only, or not the ControlNet)")
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
