"""End to end: `scripts/txt2img.py` on a full-size SD 2.x checkpoint, beside diffusers' components.

    python bench/txt2img_e2e.py [--size 512] [--steps 20] [--sampler "DPM++ 2M"]
                                [--out bench/results/txt2img_e2e.json --force]
    python bench/txt2img_e2e.py --smoke      # tiny widths: checks the script in about a minute

The bench writes a checkpoint of `configs/stable-diffusion/v2-inference.yaml` with seeded random
weights (zero-initialised layers too, so every layer does real work; fp32, official layout
`{"state_dict": ...}`) into a temporary folder, then runs the script in a child process once per
setting (the default, which on a CPU with native bfloat16 is bfloat16 autocast for a model this
size; the same with tcmalloc preloaded, `LD_PRELOAD`; and `--precision full --no-bf16`, plain
float32; on request `--winograd 1` with tcmalloc, the exact levers that pay where the default is float32)
and records its wall time (load, text encoding, sampling, decoding, saving) and the
child's peak RSS. The target for peak RSS is 1.1x the fp32 weights' own size + 1.5 GB.

The peer: diffusers has no single script for this work, so a worker times its components on the same
shapes in fp32 (its CPU default): CLIPTextModel of the SD 2.x text encoder's size encoding the prompt
and the empty prompt, `steps` U-Net calls at CFG batch 2 (one timed call after a warm-up, times
`steps`) and AutoencoderKL's decode; the bench prints their sum beside our total. Random weights
there: timing does not depend on their values. diffusers is used as bench/README.md says
(`PYTHONPATH=/tmp/peer_diffusers`); without it the peer rows are skipped.
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _results import (ALLOCATORS, add_out_arguments, checked_results_path, machine_record, shown_path,
                      write_results)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"
PROMPT = "a professional photograph of an astronaut riding a horse"
# name: (flags, memory allocator preloaded into the child or None)
RUNS = {"default": ([], None), "default+tcmalloc": ([], "tcmalloc"),
        "fp32": (["--precision", "full", "--no-bf16"], None), "winograd+tcmalloc": (["--winograd", "1"], "tcmalloc")}


def smoke_config(path):
    """v2-inference.yaml with tiny widths (same graph), written to ``path``."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(CONFIG)
    unet = config.model.params.unet_config.params
    unet.model_channels, unet.num_head_channels, unet.context_dim = 32, 8, 64
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    ddconfig.ch = 32
    text = config.model.params.cond_stage_config.params
    text.arch = {"embed_dim": 64, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64,
                                               "heads": 4, "layers": 2}}
    OmegaConf.save(config, path)
    return path


def write_checkpoint(config_path, ckpt_path):
    """Seeded random weights for ``config_path`` saved as an official-layout .ckpt; returns the fp32 bytes."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(config_path).model)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                torch.nn.init.normal_(param, std=0.02)
    sd = model.state_dict()
    torch.save({"state_dict": sd, "global_step": 0}, ckpt_path)
    return sum(t.numel() * t.element_size() for t in sd.values())


def run_script(name, flags, allocator, args, config_path, ckpt_path, workdir):
    cmd = [sys.executable, str(REPO / "scripts" / "txt2img.py"), "--ckpt", str(ckpt_path),
           "--config", str(config_path), "--H", str(args.size), "--W", str(args.size),
           "--steps", str(args.steps), "--sampler", args.sampler, "--n_samples", "1",
           "--prompt", PROMPT, "--outdir", str(Path(workdir) / f"out-{name}"), *flags]
    print(f"... txt2img {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    env = child_env(args)
    if allocator is not None:
        if not Path(ALLOCATORS[allocator]).exists():
            return {"run": name, "flags": flags, "error": f"{ALLOCATORS[allocator]} is not installed"}
        env["LD_PRELOAD"] = ALLOCATORS[allocator]
    t0 = time.perf_counter()
    # a child of its own, so that ru_maxrss of the children is this run's peak
    proc = subprocess.run([sys.executable, __file__, "--measure-child", "--", *cmd],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        return {"run": name, "flags": flags, "error": lines[-1]}
    peak_gb = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    result = {"run": name, "flags": flags, "wall_s": wall, "peak_rss_gb": peak_gb}
    if allocator is not None:
        result["allocator"] = f"LD_PRELOAD={ALLOCATORS[allocator]}"
    return result


def child_env(args):
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def measure_child(cmd):
    """Run ``cmd``; print its peak RSS as JSON and exit with its code."""
    code = subprocess.run(cmd).returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(json.dumps({"peak_rss_gb": peak}))
    return code


def diffusers_vae_kwargs(ddconfig):
    """AutoencoderKL arguments equivalent to an official first-stage ``ddconfig``."""
    levels = len(ddconfig["ch_mult"])
    return dict(in_channels=ddconfig["in_channels"], out_channels=ddconfig["out_ch"],
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                block_out_channels=[ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
                layers_per_block=ddconfig["num_res_blocks"], latent_channels=ddconfig["z_channels"])


def diffusers_components(args, config_path):
    """Times of diffusers' text encoder, U-Net and VAE decode for one image (worker process)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from unet_step import diffusers_kwargs

    if args.threads:
        torch.set_num_threads(args.threads)
    config = OmegaConf.to_container(OmegaConf.load(config_path).model.params)
    text_arch = config["cond_stage_config"]["params"].get("arch", "ViT-H-14")
    text = text_arch["text_cfg"] if isinstance(text_arch, dict) else \
        {"width": 1024, "heads": 16, "layers": 24, "context_length": 77, "vocab_size": 49408}
    # SD 2.x runs the OpenCLIP text tower to its penultimate layer: diffusers converts it to 23 layers
    text_model = CLIPTextModel(CLIPTextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["width"], intermediate_size=4 * text["width"],
        num_attention_heads=text["heads"], num_hidden_layers=text["layers"] - 1,
        max_position_embeddings=text["context_length"], hidden_act="gelu", projection_dim=text["width"])).eval()
    unet_params = dict(config["unet_config"]["params"], use_checkpoint=False)
    unet = UNet2DConditionModel(**diffusers_kwargs(unet_params)).eval()
    vae = AutoencoderKL(**diffusers_vae_kwargs(config["first_stage_config"]["params"]["ddconfig"])).eval()
    latent = args.size // 8
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, text["vocab_size"], (2, text["context_length"]), generator=gen)
    x = torch.randn(2, 4, latent, latent, generator=gen)
    times = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        context = text_model(tokens).last_hidden_state
        times["text_encoder_s"] = time.perf_counter() - t0
        t = torch.full((2,), 999)
        unet(x, t, encoder_hidden_states=context)  # warm-up
        t0 = time.perf_counter()
        unet(x, t, encoder_hidden_states=context)
        times["unet_step_s"] = time.perf_counter() - t0
        times["unet_s"] = times["unet_step_s"] * args.steps
        t0 = time.perf_counter()
        vae.decode(x[:1]).sample
        times["vae_decode_s"] = time.perf_counter() - t0
    times["sum_s"] = times["text_encoder_s"] + times["unet_s"] + times["vae_decode_s"]
    print(json.dumps(times))


def run_peer(args, config_path):
    if importlib.util.find_spec("diffusers") is None:
        return {"error": "diffusers is not importable: peer skipped"}
    print("... diffusers components", file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "--peer-worker", "--config", str(config_path), "--size", str(args.size),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(report):
    weights_gb = report["fp32_weights_gb"]
    target = 1.1 * weights_gb + 1.5
    print(f"{report['size']}px, {report['steps']} steps of {report['sampler']}; fp32 weights {weights_gb:.2f} GB, "
          f"peak RSS target {target:.2f} GB")
    print(f"{'run':<28} {'wall s':>8} {'peak RSS GB':>12}")
    for run in report["ours"]:
        label = f"ours {run['run']} {' '.join(run['flags'])}".strip()
        if "error" in run:
            print(f"{label:<28} failed: {run['error']}")
        else:
            print(f"{label:<28} {run['wall_s']:>8.1f} {run['peak_rss_gb']:>12.2f}")
    peer = report["diffusers"]
    if "error" in peer:
        print(f"{'diffusers components':<28} {peer['error']}")
    else:
        parts = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in peer.items() if k not in ("sum_s", "unet_step_s"))
        print(f"{'diffusers components (sum)':<28} {peer['sum_s']:>8.1f}   ({parts})")


def run_all(args):
    with tempfile.TemporaryDirectory(prefix="txt2img_e2e-") as workdir:
        config_path = smoke_config(Path(workdir) / "smoke.yaml") if args.smoke else CONFIG
        ckpt_path = Path(workdir) / "random-v2.ckpt"
        print(f"... writing {ckpt_path.name}", file=sys.stderr, flush=True)
        weight_bytes = write_checkpoint(config_path, ckpt_path)
        ours = [run_script(name, *RUNS[name], args, config_path, ckpt_path, workdir) for name in args.runs]
        peer = run_peer(args, config_path)
    report = {"what": "scripts/txt2img.py wall time (load, text, sampling, decode, save) and peak RSS; "
                      "diffusers: sum of its components' times for the same work",
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "config": "smoke" if args.smoke else shown_path(CONFIG), "size": args.size, "steps": args.steps,
              "sampler": args.sampler, "fp32_weights_gb": weight_bytes / 2**30,
              "peak_rss_target_gb": 1.1 * weight_bytes / 2**30 + 1.5, "machine": machine_record(),
              "ours": ours, "diffusers": peer}
    print_table(report)
    write_results(args.out, report)
    return 1 if any("error" in run for run in ours) else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the children (0: default)")
    p.add_argument("--smoke", action="store_true", help="tiny widths, to check the script itself")
    p.add_argument("--runs", nargs="+", default=list(RUNS)[:3], choices=list(RUNS), help="which of our runs")
    add_out_arguments(p, "txt2img_e2e")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure-child"]:
        return measure_child(argv[2:])
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.peer_worker:
        diffusers_components(args, args.config)
        return 0
    from ldm.errors import UserError
    try:
        args.out = checked_results_path(args.out, args.force, "txt2img_e2e")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
