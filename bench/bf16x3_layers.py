"""Could bfloat16 hardware give float32 answers faster? The "bf16x3" split, timed on the U-Net's layers.

    python bench/bf16x3_layers.py [--threads 2] [--out bench/results/bf16x3_layers.json --force]

The issue behind bench/unet_step.py asks for a U-Net step 1.5x faster than diffusers' in float32 while
staying within 1e-3 of our float32 output. Plain bfloat16 is 3-9x faster per layer on a CPU with AMX
but is off by ~1e-2. The split that GPU libraries use to emulate float32 on low-precision units
writes each operand as a bfloat16 head plus a bfloat16 tail (x = x_hi + x_lo, w = w_hi + w_lo) and
sums x_hi w_hi + x_lo w_hi + x_hi w_lo, as one product with three times the inner dimension. PyTorch's
CPU kernels round a bfloat16 product's output to bfloat16, which would undo the split, so the output is
taken in two parts: a plain bfloat16 pass gives y_hat, and oneDNN's fused "add" post-op (applied to the
float32 accumulator, before rounding) gives z = y_hat - (the three-term sum); y = y_hat - z in float32.

Each row times one layer shape of the 512px SD 2.x U-Net (CFG batch 2) in float32, in plain bfloat16
and split, with the split's error against a float64 reference (max abs over max abs). Layers are timed
alone, so the table says whether the lever can pay before anyone wires it into a model.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _results import add_out_arguments, machine_record, results_path, write_results

BF16 = torch.bfloat16
CHANNELS_LAST = torch.channels_last
# (kind, shape): conv (in, out, kernel, stride, side) on channels-last maps; linear (tokens, in, out)
LAYERS = [("conv", (320, 320, 3, 1, 64)), ("conv", (320, 320, 3, 2, 64)), ("conv", (640, 640, 3, 1, 32)),
          ("conv", (1280, 1280, 3, 1, 16)), ("linear", (8192, 320, 320)), ("linear", (8192, 320, 2560)),
          ("linear", (8192, 1280, 320)), ("linear", (2048, 640, 5120))]


def split(t):
    head = t.to(BF16)
    return head, (t - head.float()).to(BF16)


def conv_split(x, w_hi, w3_neg, stride):
    x_hi, x_lo = split(x)
    y_hat = F.conv2d(x_hi, w_hi, None, stride, w_hi.shape[-1] // 2)
    pad = [w_hi.shape[-1] // 2] * 2
    z = torch.ops.mkldnn._convolution_pointwise.binary(torch.cat([x_hi, x_lo, x_hi], 1), y_hat, w3_neg, None, pad,
                                                       [stride] * 2, [1, 1], 1, "add", None, None, [], None)
    return y_hat.float().sub_(z.float())


def linear_split(x, w_hi, w3_neg):
    x_hi, x_lo = split(x)
    y_hat = F.linear(x_hi, w_hi)
    z = torch.ops.mkldnn._linear_pointwise.binary(torch.cat([x_hi, x_lo, x_hi], -1), y_hat, w3_neg, None, "add")
    return y_hat.float().sub_(z.float())


def fused_ops_supported():
    """Whether oneDNN runs its fused bfloat16 ops here: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and
    refuses on an AVX2-only CPU."""
    x = torch.zeros(1, 2, dtype=BF16)
    try:
        torch.ops.mkldnn._linear_pointwise.binary(x, torch.zeros(1, 2, dtype=BF16), torch.zeros(2, 2, dtype=BF16),
                                                  None, "add")
    except RuntimeError:
        return False
    return True


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(kind, shape, repeats):
    gen = torch.Generator().manual_seed(0)
    if kind == "conv":
        cin, cout, k, stride, side = shape
        x = torch.randn(2, cin, side, side, generator=gen).contiguous(memory_format=CHANNELS_LAST)
        w = (torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5).contiguous(memory_format=CHANNELS_LAST)
        fp32 = lambda: F.conv2d(x, w, None, stride, k // 2)
        x_b, w_b = x.to(BF16), w.to(BF16)
        bf16 = lambda: F.conv2d(x_b, w_b, None, stride, k // 2)
        w_hi, w_lo = split(w)
        w3_neg = torch.cat([w_hi, w_hi, w_lo], 1).neg().contiguous(memory_format=CHANNELS_LAST)
        split_fn = lambda: conv_split(x, w_hi, w3_neg, stride)
        reference = F.conv2d(x.double(), w.double(), None, stride, k // 2)
    else:
        tokens, cin, cout = shape
        x = torch.randn(tokens, cin, generator=gen)
        w = torch.randn(cout, cin, generator=gen) / cin ** 0.5
        fp32 = lambda: F.linear(x, w)
        x_b, w_b = x.to(BF16), w.to(BF16)
        bf16 = lambda: F.linear(x_b, w_b)
        w_hi, w_lo = split(w)
        w3_neg = torch.cat([w_hi, w_hi, w_lo], 1).neg().contiguous()
        split_fn = lambda: linear_split(x, w_hi, w3_neg)
        reference = F.linear(x.double(), w.double())
    scale = reference.abs().max().item()

    def err(out):
        return (out.double() - reference).abs().max().item() / scale

    with torch.inference_mode():
        row = {"kind": kind, "shape": list(shape),
               "fp32_ms": median_ms(fp32, repeats), "bf16_ms": median_ms(bf16, repeats),
               "bf16x3_ms": median_ms(split_fn, repeats),
               "fp32_err": err(fp32()), "bf16_err": err(bf16()), "bf16x3_err": err(split_fn())}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="two small layers, to check the script itself")
    add_out_arguments(p, "bf16x3_layers")
    args = p.parse_args(argv)
    try:
        out = results_path(args.out, args.force, "bf16x3_layers")
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not fused_ops_supported():
        print("error: oneDNN's fused bfloat16 ops need a CPU with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; "
              "run this bench on one", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [("conv", (16, 16, 3, 1, 8)), ("linear", (64, 16, 32))] if args.smoke else LAYERS
    rows = []
    print(f"{'layer':<28}{'fp32 ms':>9}{'bf16 ms':>9}{'bf16x3 ms':>11}{'x3/fp32':>9}{'bf16 err':>10}{'x3 err':>10}")
    for kind, shape in layers:
        row = measure(kind, shape, args.repeats)
        rows.append(row)
        print(f"{kind + ' ' + 'x'.join(map(str, shape)):<28}{row['fp32_ms']:>9.1f}{row['bf16_ms']:>9.1f}"
              f"{row['bf16x3_ms']:>11.1f}{row['bf16x3_ms'] / row['fp32_ms']:>9.2f}{row['bf16_err']:>10.1e}"
              f"{row['bf16x3_err']:>10.1e}")
    total = {key: sum(r[key] for r in rows) for key in ("fp32_ms", "bf16_ms", "bf16x3_ms")}
    print(f"{'sum':<28}{total['fp32_ms']:>9.1f}{total['bf16_ms']:>9.1f}{total['bf16x3_ms']:>11.1f}"
          f"{total['bf16x3_ms'] / total['fp32_ms']:>9.2f}")
    write_results(out, {"command": " ".join(["python", "bench/bf16x3_layers.py", *(argv or sys.argv[1:])]),
                        "machine": machine_record(), "threads": torch.get_num_threads(), "rows": rows,
                        "total": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
