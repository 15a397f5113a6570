"""``--lora FILE:WEIGHT``, ``--lora-dir DIR``, ``--hypernetwork FILE:MULT``, ``--hypernetwork-dir DIR`` and the
``<lora:...>`` / ``<hypernet:...>`` tags of prompts, for the sampling scripts.

As A1111, the tags of a batch's first prompt choose the LoRAs and hypernetworks of the whole batch, every prompt's
tags are taken out of its text, and the negative prompt's tags are taken out too without being applied (A1111
leaves them in the negative prompt as text; neither acts on the unconditional side only).

The PNG's ``parameters`` name them with their hashes: LoRAs as A1111's Lora extension writes them (``Lora hashes``);
hypernetworks in the fields A1111 wrote while it had one hypernetwork setting (``Hypernet: name, Hypernet hash:
<sha256, 10 digits>, Hypernet strength: m``, the strength only when it is not 1), which A1111 still reads back as a
``<hypernet:name:m>`` tag (it now keeps the tag in the prompt instead; ours leaves tags out of the prompt). Several
hypernetworks list their names, hashes and strengths in order, quoted (A1111 reads back only one). The hash is
the one A1111 gives hypernetworks and models today (the first A1111 versions wrote an older 8-digit model hash).
"""
import json
import logging
from pathlib import Path

from ldm.errors import UserError
from ldm.modules.extra_networks import TAG, parse_prompt, warn_skipped

log = logging.getLogger(__name__)


def weighted_file_flag(text):
    """argparse ``type`` of ``--lora`` and ``--hypernetwork``: ``FILE`` or ``FILE:WEIGHT`` -> (FILE, weight)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a ':' inside the file name
    return text, 1.0


def check_extra_network_flags(args):
    for flag, files, folder, what in (("--lora", args.lora, args.lora_dir, "LoRA"),
                                      ("--hypernetwork", args.hypernetwork, args.hypernetwork_dir, "hypernetwork")):
        for path, _ in files or ():
            if not Path(path).is_file():
                raise UserError(f"{flag} '{path}' does not exist; pass a {what} file, optionally with :WEIGHT")
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"{flag}-dir '{folder}' is not a folder; pass the folder of {what} files")


def take_extra_networks(args, model, prompts):
    """Merge the ``--lora`` files and the LoRAs the prompts name into ``model`` and attach the ``--hypernetwork``
    files and the hypernetworks they name; returns the prompts without their tags. ``args.negative_prompt`` loses
    its tags; ``args.lora_merger`` and ``args.hypernetwork_hooks`` (taken off by :func:`remove_extra_networks` after
    sampling), ``args.lora_hashes`` and ``args.hypernet``, ``hypernet_hash``, ``hypernet_strength`` (for the PNG) are
    set. Batches whose first prompts name different tags are refused: one set serves the whole run."""
    from ldm.generate import batches
    parsed_negative = parse_prompt(args.negative_prompt or "")
    if parsed_negative.loras or parsed_negative.hypernets or parsed_negative.skipped:
        log.warning("the negative prompt's tags %s are not applied (LoRAs and hypernetworks act on both sides of "
                    "guidance: put <lora:name:-1> in the prompt instead); they were removed from it",
                    ", ".join(_tags(args.negative_prompt)))
        args.negative_prompt = parsed_negative.text
    single = isinstance(prompts, str)
    parsed = [parse_prompt(p) for p in ([prompts] if single else prompts)]
    warn_skipped([tag for p in parsed for tag in p.skipped])
    firsts = [batch[0] for batch in batches(parsed, args.n_samples)]
    first = firsts[0]
    if any((p.loras, p.hypernets) != (first.loras, first.hypernets) for p in firsts[1:]):
        raise UserError("the prompts of different batches name different <lora:...> or <hypernet:...> tags; as in "
                        "A1111 the first prompt of a batch sets them, but one run here applies one set: split the file")
    args.lora_merger, args.lora_hashes, args.hypernetwork_hooks = None, None, None
    args.hypernet, args.hypernet_hash, args.hypernet_strength = None, None, None
    try:
        _merge_loras(args, model, first.loras)
        _attach_hypernetworks(args, model, first.hypernets)
    except BaseException:
        remove_extra_networks(args)  # never leave half a set applied
        raise
    texts = [p.text for p in parsed]
    return texts[0] if single else texts


def remove_extra_networks(args):
    """Take what :func:`take_extra_networks` applied off the model again (its own computation, bit for bit)."""
    for applied in (getattr(args, "lora_merger", None), getattr(args, "hypernetwork_hooks", None)):
        if applied is not None:
            applied.remove()


def _merge_loras(args, model, tags):
    files = [(Path(path), weight, weight, Path(path).stem) for path, weight in args.lora or ()]
    if tags and args.lora_dir is None:
        raise UserError(f"the prompt names <lora:{tags[0].name}>; pass --lora-dir with the folder of LoRA files")
    from ldm.modules.lora import LoraMerger, find_lora_file, lora_use
    files += [(find_lora_file(t.name, args.lora_dir), t.text_encoder, t.unet, t.name) for t in tags]
    if not files:
        return
    from ldm.modules.lora.hashes import lora_short_hash
    merger = LoraMerger(model)
    args.lora_merger = merger
    merger.apply([lora_use(merger.load(path), te, unet) for path, te, unet, _ in files])
    # A1111 drops ':' and ',' from the names, which would break its "name: hash, ..." list
    args.lora_hashes = json.dumps(", ".join(f"{name.replace(':', '').replace(',', '')}: {lora_short_hash(path)}"
                                            for path, _, _, name in dict.fromkeys(files)),
                                  ensure_ascii=False)  # quoted, as A1111 quotes a value with ':' or ','


def _attach_hypernetworks(args, model, tags):
    files = [(Path(path), multiplier) for path, multiplier in args.hypernetwork or ()]
    if tags and args.hypernetwork_dir is None:
        raise UserError(f"the prompt names <hypernet:{tags[0].name}>; pass --hypernetwork-dir with the folder of "
                        f"hypernetwork files")
    from ldm.modules.hypernetworks import (
        HypernetworkHooks,
        HypernetworkUse,
        find_hypernetwork_file,
    )
    files += [(find_hypernetwork_file(t.name, args.hypernetwork_dir), t.multiplier) for t in tags]
    if not files:
        return
    from ldm.checkpoint import file_hash
    hooks = HypernetworkHooks(model)
    args.hypernetwork_hooks = hooks
    hooks.apply([HypernetworkUse(hooks.load(path), multiplier) for path, multiplier in files])
    # A1111 names a hypernetwork by its file name and hashes it as a model: sha256, 10 hex digits
    args.hypernet = _a1111_value(", ".join(path.stem for path, _ in files))
    args.hypernet_hash = _a1111_value(", ".join(file_hash(path) for path, _ in files))
    if any(multiplier != 1 for _, multiplier in files):
        args.hypernet_strength = _a1111_value(", ".join(str(float(m)) for _, m in files))


def _a1111_value(text):
    """A field value as A1111 writes it: JSON-quoted when it holds ',' or ':' (else it would split the line)."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _tags(text):
    return [m.group(0) for m in TAG.finditer(text)]
