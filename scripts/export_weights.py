"""Export a training checkpoint as inference weights (safetensors, EMA weights by default).

    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt models/ldm/shapes/model.safetensors
"""
import argparse
import logging
import sys

from ldm.errors import UserError
from ldm.export import export_weights


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="training checkpoint (.ckpt) written by main.py")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--no-ema", action="store_true", help="keep the trained weights instead of their EMA")
    parser.add_argument("--half", action="store_true", help="store float16 instead of float32")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args = parser.parse_args(argv)
        summary = export_weights(args.ckpt, args.out, use_ema=not args.no_ema, half=args.half)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['path']}: {summary['tensors']} tensors ({summary['dtype']}), "
          f"{summary['ema_copied']} from EMA, {summary['dropped']} training-only tensors dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

