"""Write images of a shapes concept (ldm.data.shapes_concepts) to a captioned folder (png + txt).

    python scripts/shapes_concept_images.py instance data/dreambooth/instance --n 8

The DreamBooth instance images of the shapes proof: one orange large triangle, captioned
"a sks triangle ..." (--word changes "sks"); the folder is what main.py's captioned-folder
dataset (ldm.data.captioned_folder.CaptionedImageFolder) trains from.
"""
import argparse
import sys

from ldm.cli import ArgumentParser, number_in, run


def _main(argv):
    from ldm.data.shapes_concepts import CONCEPTS
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concept", choices=CONCEPTS, help="which concept to draw")
    parser.add_argument("outdir", help="the folder to write NNNNN.png + NNNNN.txt into")
    parser.add_argument("--n", type=number_in("--n", 1, kind=int), default=8, help="how many images")
    parser.add_argument("--word", type=str, default=None, help="the trigger word in the captions")
    parser.add_argument("--size", type=number_in("--size", 16, kind=int), default=64, help="image side in pixels")
    parser.add_argument("--seed", type=number_in("--seed", 0, kind=int), default=0, help="which images")
    args = parser.parse_args(argv)
    from ldm.data.captioned_folder import write_dataset_items
    from ldm.data.shapes_concepts import ShapesConcept
    concept = ShapesConcept(args.concept, word=args.word, length=args.n, size=args.size, seed=args.seed)
    paths = write_dataset_items(concept, args.outdir)
    print(f"{len(paths)} {args.concept} images with captions in {args.outdir}/")
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
