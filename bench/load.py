"""Loading an official-format SD 1.x checkpoint: seconds and peak RSS, the official way and ours.

    python bench/load.py [--workdir DIR] [--threads N] [--out bench/results/load.json --force]
    python bench/load.py --smoke            # tiny widths: checks the script in seconds

Writes a checkpoint with random weights for configs/stable-diffusion/v1-inference.yaml as the
official Lightning checkpoints hold it ({"state_dict": ..., "global_step": N}, float32, ~4.3 GB)
and a .safetensors file of the same weights into --workdir (default: a temporary folder, deleted
after), then runs each of these in a fresh process:

- official: what the official scripts' ``load_model_from_config`` does: ``torch.load`` reads the
  whole file, the model is built with random initialisation, ``load_state_dict`` copies into it;
- ours .ckpt / ours .safetensors: ``ldm.checkpoint.load_model`` (mapped file, no initialisation,
  the file's tensors become the parameters);
- txt2img .ckpt: ``scripts/txt2img.py`` end to end, 2 DDIM steps at 64x64, one sample.

Load s is the wall time of the load call in the process (interpreter start and imports excluded);
process s the wall time of the whole process. Peak RSS is the process's maximum resident set
(``getrusage``, read with ``os.wait4``); pages of a mapped file count once they are touched, so
"RSS after load" says how much of the file a load already read. The files were just written (and
flushed to disk before the first run), so they are in the page cache: these are warm-cache loads.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _results import add_out_arguments, checked_results_path, machine_record, shown_path, write_results  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
GLOBAL_STEP = 470000  # any count; the official files carry the step they were saved at
LOADS = (("official", "ckpt"), ("ours", "ckpt"), ("ours", "safetensors"))
TXT2IMG_FLAGS = ["--H", "64", "--W", "64", "--steps", "2", "--n_samples", "1"]
# the smoke model: the same graph at toy widths (the text encoder a 1-layer CLIP of width 32)
SMOKE_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  projection_dim=32)


# ---------------------------------------------------------------------------------------------
# in the worker processes

def current_rss_gb():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def load_official(config_path, ckpt_path):
    """The official scripts' load_model_from_config (without .cuda()): read, build with init, copy."""
    import torch
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(config_path)
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    model = instantiate_from_config(config.model)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def load_ours(config_path, ckpt_path):
    from ldm.checkpoint import load_model
    return load_model(config_path, ckpt_path, device="cpu")


def write_files(config_path, ckpt_path, safetensors_path):
    """A random-weight model of the config saved as an official Lightning .ckpt and as .safetensors."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    sd = instantiate_from_config(OmegaConf.load(config_path).model).state_dict()
    torch.save({"state_dict": sd, "global_step": GLOBAL_STEP}, ckpt_path)
    save_file(sd, safetensors_path)
    return {"tensors": len(sd), "params": sum(v.numel() for v in sd.values())}


def run_worker(args):
    """One load (or the file writing) in this process; prints one JSON line."""
    import torch

    if args.worker == "write":
        print(json.dumps(write_files(args.config, args.ckpt, args.safetensors)))
        return 0
    load = load_official if args.worker == "official" else load_ours
    # imports are not load time
    import ldm.models.diffusion.ddpm  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401
    rss_before = current_rss_gb()
    started = time.perf_counter()
    model = load(args.config, args.ckpt)
    seconds = time.perf_counter() - started
    weight = model.model.diffusion_model.input_blocks[0][0].weight  # random (out layers are zero)
    print(json.dumps({"load_s": seconds, "rss_before_gb": rss_before, "rss_after_gb": current_rss_gb(),
                      "threads": torch.get_num_threads(),
                      # reads one tensor: the three loads must agree on it
                      "check": float(weight.double().sum())}))
    return 0


# ---------------------------------------------------------------------------------------------
# in the main process

def measured(cmd, env):
    """Run ``cmd``; (wall seconds, peak RSS GB of the process and what it waited for, exit code,
    stdout, stderr). Output goes through files, so that a chatty child cannot block on a pipe."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0), err.seek(0)
        return seconds, usage.ru_maxrss / 2**20, proc.returncode, out.read(), err.read()


def worker_cmd(kind, config, files):
    return [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--config", str(config),
            "--ckpt", str(files["ckpt"]), "--safetensors", str(files["safetensors"])]


def failure(stderr, code):
    return (stderr.strip().splitlines() or [f"exit {code}"])[-1]


def smoke_config(config_path, folder):
    """The config at toy widths, written to ``folder`` (txt2img reads it from there)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path)
    params = config.model.params
    params.unet_config.params.update(model_channels=32, num_heads=4, context_dim=SMOKE_TEXT["hidden_size"])
    params.first_stage_config.params.ddconfig.ch = 32
    params.cond_stage_config.params = {"text_config": SMOKE_TEXT}
    path = Path(folder) / "smoke-v1-inference.yaml"
    OmegaConf.save(config, path)
    return path


def run_all(args, folder, log):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    config = smoke_config(args.config, folder) if args.smoke else Path(args.config)
    files = {"ckpt": folder / "model.ckpt", "safetensors": folder / "model.safetensors"}
    log(f"writing {shown_path(files['ckpt'])} and .safetensors")
    seconds, _, code, out, err = measured(worker_cmd("write", config, files), env)
    if code != 0:
        raise SystemExit(f"writing the checkpoint failed: {failure(err, code)}")
    written = json.loads(out.strip().splitlines()[-1])
    log("flushing them to disk")
    os.sync()  # else the kernel writes GBs back while the loads run, and their times wander
    report = {"config": shown_path(args.config), "smoke": args.smoke, "threads": args.threads or None,
              "write_s": seconds, **written,
              "files": {suffix: {"bytes": path.stat().st_size} for suffix, path in files.items()}, "rows": []}
    for way, suffix in LOADS:
        log(f"{way} load of .{suffix}")
        kind = "official" if way == "official" else "ours"
        seconds, peak, code, out, err = measured(worker_cmd(kind, config, files) + ["--load", suffix], env)
        row = {"way": way, "file": suffix, "process_s": seconds, "peak_rss_gb": peak}
        if code == 0:
            row.update(json.loads(out.strip().splitlines()[-1]))
        else:
            row["error"] = failure(err, code)
        report["rows"].append(row)
    log("txt2img end to end")
    cmd = [sys.executable, str(REPO / "scripts" / "txt2img.py"), "--ckpt", str(files["ckpt"]), "--config",
           str(config), *TXT2IMG_FLAGS, "--device", "cpu", "--outdir", str(folder / "txt2img")]
    seconds, peak, code, _, err = measured(cmd, env)
    row = {"way": "txt2img", "file": "ckpt", "process_s": seconds, "peak_rss_gb": peak,
           "command": shlex.join(["python", "scripts/txt2img.py", "--ckpt", "<ckpt>", "--config",
                                  shown_path(config) if not args.smoke else "<smoke config>", *TXT2IMG_FLAGS])}
    if code != 0:
        row["error"] = failure(err, code)
    report["rows"].append(row)
    for row in report["rows"]:
        row["peak_over_file"] = row["peak_rss_gb"] * 2**30 / report["files"][row["file"]]["bytes"]
    return report


def print_table(report):
    gb = {suffix: f["bytes"] / 2**30 for suffix, f in report["files"].items()}
    print(f"config {report['config']}{' (smoke widths)' if report['smoke'] else ''}: {report['params'] / 1e6:.0f} M "
          f"parameters, {report['tensors']} tensors; .ckpt {gb['ckpt']:.2f} GiB, .safetensors "
          f"{gb['safetensors']:.2f} GiB")
    print("| run | file | load s | process s | RSS after imports GiB | RSS after load GiB | peak RSS GiB "
          "| peak / file size |")
    print("|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        cells = [_cell(row, "load_s", ".1f"), _cell(row, "process_s", ".1f"), _cell(row, "rss_before_gb", ".2f"),
                 _cell(row, "rss_after_gb", ".2f"), _cell(row, "peak_rss_gb", ".2f"),
                 _cell(row, "peak_over_file", ".2f")]
        print(f"| {row['way']} | .{row['file']} | {' | '.join(cells)} |")
        if row.get("error"):
            print(f"  {row['way']} .{row['file']} failed: {row['error']}")
    checks = {row["check"] for row in report["rows"] if "check" in row}
    if len(checks) > 1:
        print(f"note: the loads disagree on the U-Net's output weight sum: {sorted(checks)}")


def _cell(row, key, fmt):
    return format(row[key], fmt) if row.get(key) is not None else "-"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the model config (default: SD 1.x v1-inference)")
    p.add_argument("--workdir", default=None,
                   help="folder for the written checkpoints, kept after (default: a temporary folder, deleted)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every process (0: inherited)")
    p.add_argument("--smoke", action="store_true", help="the config at toy widths, to check the script")
    add_out_arguments(p, "load")
    # internal: one process per load
    p.add_argument("--worker", choices=["write", "official", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--safetensors", help=argparse.SUPPRESS)
    p.add_argument("--load", choices=["ckpt", "safetensors"], default="ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be at least 0")
    return args


def main(argv=None):
    from ldm.cli import run
    argv = sys.argv[1:] if argv is None else list(argv)

    def body(argv):
        args = parse_args(argv)
        if args.worker:
            if args.load == "safetensors":
                args.ckpt = args.safetensors
            return run_worker(args)
        out = checked_results_path(args.out, args.force, "load")   # refused before minutes of work
        started = time.perf_counter()

        def log(message):
            print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

        folder = Path(args.workdir or tempfile.mkdtemp(prefix="bench-load-"))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            report = run_all(args, folder, log)
        finally:
            if args.workdir is None:
                shutil.rmtree(folder, ignore_errors=True)
        report = {"what": "load time and peak RSS of an official-format SD 1.x checkpoint; each run a fresh "
                          "process, warm page cache",
                  "command": shlex.join(["python", "bench/load.py", *argv]), "machine": machine_record(),
                  **report}
        print_table(report)
        write_results(out, report)
        return 1 if any(row.get("error") for row in report["rows"]) else 0

    return run(body, argv)


if __name__ == "__main__":
    sys.exit(main())
