"""Can any prompt vector make the shipped model draw a colour it was never trained on?

Textual inversion only searches the text-embedding space, so it can teach a word for a colour only if
some vector there makes the U-Net draw it. This places hand-made vectors in the colour word's slot
(the new colour's trigger word, as an embedding file) and reads back the colour of the shapes drawn:
the two palette colours nearest to the new one (blue and green for cyan), their mean, their sum, and
an extrapolation away from a third colour. If none of them draws the new colour, textual inversion's
target for it is out of this model's reach, whatever the training.

    python bench/embedding_reach.py --out bench/results/embedding_reach.json --force
"""
import collections
import shlex
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, checked_results_path, write_results  # noqa: E402

from ldm.cli import ArgumentParser, run, shipped_sampling  # noqa: E402
from ldm.data.shapes import COLOURS, prompt_set  # noqa: E402
from ldm.data.shapes_concepts import concept_colour  # noqa: E402
from ldm.errors import UserError  # noqa: E402

WORD = "cyan"
NEIGHBOURS = ("blue", "green")
AWAY_FROM = "red"


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=54, help="prompts per vector (colour word replaced by the new one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    add_out_arguments(p, "embedding_reach")
    return p.parse_args(argv)


def token_vector(encoder, word):
    ids = [i for i in encoder.tokenizer.encode(word) if i not in (49406, 49407)]   # without start/end tokens
    if len(ids) != 1:
        raise UserError(f"'{word}' is {len(ids)} tokens; pick one-token words")
    return encoder.token_embedding.weight.detach()[ids[0]].clone()


def candidate_vectors(encoder):
    a, b = (token_vector(encoder, w) for w in NEIGHBOURS)
    away = token_vector(encoder, AWAY_FROM)
    return {f"{NEIGHBOURS[0]}": a, f"{NEIGHBOURS[1]}": b, "mean": (a + b) / 2, "sum": a + b,
            f"1.5 ({NEIGHBOURS[0]} + {NEIGHBOURS[1]}) - {AWAY_FROM}": 1.5 * (a + b) - away}


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = checked_results_path(args.out, args.force, "embedding_reach")
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from ldm.checkpoint import load_model
    from ldm.generate import txt2img
    from ldm.modules.encoders.embeddings import use_embeddings
    model = load_model()
    prompts = [" ".join(WORD if w in COLOURS else w for w in p.split()) for p in prompt_set(args.prompts, seed=0)]
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, vector in candidate_vectors(model.cond_stage_model).items():
            save_file({"emb_params": vector[None].contiguous()}, str(Path(folder) / f"{WORD}.safetensors"))
            use_embeddings(model, folder)
            try:
                images = txt2img(model, prompts, seed=args.seed, n_samples=len(prompts), progress=False,
                                 **shipped_sampling())
            finally:
                use_embeddings(model, None)
            drawn = collections.Counter(str(concept_colour(image)) for image in images)
            rows[name] = {"norm": float(vector.norm()), "drawn": dict(drawn.most_common()),
                          f"{WORD}_rate": drawn.get(WORD, 0) / len(images)}
            print(f"{name:<28} norm {rows[name]['norm']:.3f}  {WORD} {100 * rows[name][f'{WORD}_rate']:5.1f}%  "
                  f"drawn {dict(drawn.most_common(3))}")
    write_results(out, {"command": shlex.join(["python", "bench/embedding_reach.py", *argv]), "word": WORD,
                        "prompts": len(prompts), "vectors": rows})
    return 0


def main(argv=None):
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
