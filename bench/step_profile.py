"""Where one full-size SD 2.x U-Net step spends its time, ours beside diffusers', by kind of layer.

    PYTHONPATH=/tmp/peer_diffusers python bench/step_profile.py [--sizes 64 96] [--levers winograd-all]
                                  [--threads 2] [--out bench/results/step_profile.json --force]

The same seeded weights and inputs as bench/unet_step.py (CFG batch 2, fp32). Forward hooks time every
layer of these kinds, exclusive of the timed layers inside it: `conv` (nn.Conv2d, Winograd included when a
lever turns it on), `linear` (nn.Linear), `norm` (GroupNorm, LayerNorm), `attention` (the attention modules
without their projections: the scaled-dot-product kernel and its reshapes), `geglu` (the gated activation
without its projection); `other` is the rest of the step (SiLU, residual adds, concatenations, upsampling,
timestep embedding). The hooks cost a few milliseconds per step. Rows: the median of ``--repeats`` timed steps
after a warm-up, per implementation and size.

What it is for: the kinds whose kernels are the same in both implementations (linear: MKL's GEMM; attention:
torch's fused SDPA) set a floor under any exact speed-up, which this table shows per size.
"""
import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from _results import add_out_arguments, checked_results_path, machine_record, write_results
from unet_step import DEFAULT_CONFIG, load_weights, make_step, unet_params, write_seeded_weights

REPO = Path(__file__).resolve().parents[1]

KINDS = ("conv", "linear", "norm", "attention", "geglu", "other")
ATTENTION_CLASSES = {"CrossAttention", "MemoryEfficientCrossAttention", "Attention"}


def kind_of(module):
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return "norm"
    name = type(module).__name__
    if name in ATTENTION_CLASSES:
        return "attention"
    if name == "GEGLU":
        return "geglu"
    return None


class LayerTimer:
    """Exclusive seconds per kind of layer: a timed layer's time less that of the timed layers it calls."""

    def __init__(self, model):
        self.seconds = defaultdict(float)
        self.stack = []
        self.handles = []
        for module in model.modules():
            kind = kind_of(module)
            if kind is not None:
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._leave(kind)))

    def _enter(self, module, args):
        self.stack.append([time.perf_counter(), 0.0])  # start, time of timed layers inside

    def _leave(self, kind):
        def hook(module, args, output):
            start, inner = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[kind] += elapsed - inner
            if self.stack:
                self.stack[-1][1] += elapsed
        return hook

    def reset(self):
        self.seconds.clear()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def profile(impl, levers, params, weights, sizes, repeats, warmup):
    from ldm.fast_inference import apply_lever

    model = load_weights(impl, params, weights)
    for lever in levers:
        apply_lever(model, lever)
    timer = LayerTimer(model)
    rows = []
    for size in sizes:
        step = make_step(model, impl, size, False, params["context_dim"])
        runs = []
        with torch.inference_mode():
            for _ in range(warmup):
                step()
            for _ in range(repeats):
                timer.reset()
                start = time.perf_counter()
                step()
                total = time.perf_counter() - start
                split = {kind: timer.seconds.get(kind, 0.0) for kind in KINDS[:-1]}
                split["other"] = total - sum(split.values())
                runs.append({"total_s": total, **{f"{kind}_s": split[kind] for kind in KINDS}})
        middle = sorted(runs, key=lambda run: run["total_s"])[len(runs) // 2]
        rows.append({"size": size, "median_run": middle, "totals_s": [run["total_s"] for run in runs],
                     "median_total_s": statistics.median(run["total_s"] for run in runs)})
        print(f"  {impl}{'+' + '+'.join(levers) if levers else ''} {size}x{size}: {middle['total_s']:.2f} s",
              flush=True)
    timer.remove()
    del model
    gc.collect()
    return rows


def print_table(report):
    print(f"\nU-Net step, fp32, CFG batch 2, {report['threads']} threads; seconds per kind of layer (share of the step)")
    header = "| row | size | step s | " + " | ".join(KINDS) + " |"
    print(header)
    print("|" + "---|" * (3 + len(KINDS)))
    for entry in report["runs"]:
        for row in entry["rows"]:
            run = row["median_run"]
            cells = " | ".join(f"{run[f'{kind}_s']:.2f} ({100 * run[f'{kind}_s'] / run['total_s']:.0f}%)"
                               for kind in KINDS)
            print(f"| {entry['name']} | {row['size']} | {run['total_s']:.2f} | {cells} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="latent side lengths")
    p.add_argument("--levers", nargs="*", default=[], metavar="LEVER",
                   help="an extra row of ours with these ldm.fast_inference levers (e.g. winograd-all)")
    p.add_argument("--impls", nargs="+", default=["ours", "diffusers"], choices=["ours", "diffusers"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--smoke", action="store_true", help="tiny widths, to check the script itself")
    add_out_arguments(p, "step_profile")
    args = p.parse_args(argv)
    from ldm.fast_inference import LEVERS
    unknown = [lever for lever in args.levers if lever not in LEVERS]
    if unknown:
        p.error(f"--levers: unknown {', '.join(unknown)}; known: {', '.join(sorted(LEVERS))}")
    if args.repeats < 1 or args.warmup < 0 or min(args.sizes) < 8 or any(size % 8 for size in args.sizes):
        p.error("--repeats must be >= 1, --warmup >= 0, --sizes multiples of 8")
    return args


def _main(argv):
    args = parse_args(argv)
    out = checked_results_path(args.out, args.force, "step_profile")   # refused before minutes of work
    if args.threads:
        torch.set_num_threads(args.threads)
    if "diffusers" in args.impls:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not importable: its rows are skipped (bench/README.md says how to install the peer)",
                  file=sys.stderr)
            args.impls = [impl for impl in args.impls if impl != "diffusers"]
    params = unet_params(args.config, args.smoke)
    sizes = sorted(args.sizes)
    rows = [(impl, []) for impl in args.impls]
    if args.levers and "ours" in args.impls:
        rows.insert(1, ("ours", list(args.levers)))
    report = {"benchmark": "step_profile", "machine": machine_record(), "threads": torch.get_num_threads(),
              "command": " ".join(sys.argv), "sizes": sizes, "kinds": list(KINDS), "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "unet.safetensors"
        write_seeded_weights(params, weights)
        for impl, levers in rows:
            name = impl + "".join(f"+{lever}" for lever in levers)
            report["runs"].append({"name": name, "impl": impl, "levers": levers,
                                   "rows": profile(impl, levers, params, weights, sizes, args.repeats, args.warmup)})
    print_table(report)
    write_results(out, report)
    return 0


def main(argv=None):
    sys.path.insert(0, str(REPO))
    from ldm.cli import run

    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
