"""Where a benchmark writes its JSON, and the machine it ran on; shared by the scripts in bench/ (run as ``python bench/<x>.py``,
so this folder is on ``sys.path``).

bench/results/<name>.json are committed: the READMEs quote them. A plain run therefore writes a new
file, bench/results/<name>-<date>-<time>.json; ``--out PATH`` names the file instead, and a file
that exists is replaced only with ``--force``. The check happens before the benchmark runs, so a
refused run costs nothing.
"""
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
# memory allocators a benchmark row preloads into its worker (LD_PRELOAD; Debian's libjemalloc2 and
# libtcmalloc-minimal4), the launcher setting the README documents
ALLOCATORS = {"jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
              "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}


def shown_path(path):
    """``path`` relative to the repo when it is inside it (the same on every clone), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def new_results_path(name, folder=None, now=None):
    """``folder/<name>-YYYYmmdd-HHMMSS.json`` (default folder: bench/results; local time ``now``, default:
    now), with ``-2``, ``-3``, ... before ``.json`` when that file exists already."""
    folder = Path(RESULTS if folder is None else folder)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    path, number = folder / f"{stem}.json", 2
    while path.exists():
        path, number = folder / f"{stem}-{number}.json", number + 1
    return path


def add_out_arguments(parser, name):
    """``--out`` and ``--force`` for benchmark ``name``."""
    parser.add_argument("--out", default=None,
                        help=f"JSON output (default: a new bench/results/{name}-<date>-<time>.json)")
    parser.add_argument("--force", action="store_true",
                        help=f"replace --out if it exists (e.g. the committed bench/results/{name}.json)")


def results_path(out, force, name):
    """The file to write: ``out`` (FileExistsError if it exists and not ``force``), or a new one if None."""
    if out is None:
        return new_results_path(name)
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it, or leave out --out to write a new file")
    return Path(out)


def checked_results_path(out, force, name):
    """:func:`results_path`, with an existing ``out`` (and no ``force``) refused as a one-line UserError, so
    that a benchmark stops before any work."""
    from ldm.errors import UserError
    try:
        return results_path(out, force, name)
    except FileExistsError as err:
        raise UserError(str(err)) from None


def write_results(path, report):
    """Write ``report`` as indented JSON to ``path`` and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


def machine_record():
    """The CPU's model name, cores and the threads torch uses, its kernels' capability and the half types
    it runs natively (what decides bf16), torch and Python versions: what a timing depends on."""
    import torch

    from ldm.precision import NAMES, host_cpu
    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = host_cpu()
    return {"cpu": model_name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_capability": cpu.capability, "native_half": sorted(NAMES[d] for d in cpu.native),
            "native_half_from": cpu.source, "torch": torch.__version__, "python": platform.python_version()}
