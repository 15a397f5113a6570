"""``--lora FILE:WEIGHT``, ``--lora-dir DIR`` and the ``<lora:...>`` tags of prompts, for the sampling scripts.

As A1111, the tags of a batch's first prompt choose the LoRAs of the whole batch, every prompt's tags are
taken out of its text, and the negative prompt's tags are taken out too without being applied (A1111
leaves them in the negative prompt as text; a LoRA cannot act on the unconditional side only).
"""
import json
import logging
from pathlib import Path

from ldm.errors import UserError
from ldm.modules.extra_networks import TAG, parse_prompt, warn_skipped

log = logging.getLogger(__name__)


def lora_flag(text):
    """argparse ``type`` of ``--lora``: ``FILE`` or ``FILE:WEIGHT`` -> (FILE, weight)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a ':' inside the file name
    return text, 1.0


def check_lora_flags(args):
    for path, _ in args.lora or ():
        if not Path(path).is_file():
            raise UserError(f"--lora '{path}' does not exist; pass a LoRA file, optionally with :WEIGHT")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise UserError(f"--lora-dir '{args.lora_dir}' is not a folder; pass the folder of LoRA files")


def take_extra_networks(args, model, prompts):
    """Merge the ``--lora`` files and the LoRAs the prompts name into ``model``; returns the prompts
    without their tags. ``args.negative_prompt`` loses its tags; ``args.lora_merger`` (to remove them
    after sampling) and ``args.lora_hashes`` (for the PNG) are set. Batches whose first prompts name
    different LoRAs are refused: one merge serves the whole run."""
    from ldm.generate import batches
    parsed_negative = parse_prompt(args.negative_prompt or "")
    if parsed_negative.loras or parsed_negative.skipped:
        log.warning("the negative prompt's tags %s are not applied (LoRAs act on both sides of guidance: put "
                    "<lora:name:-1> in the prompt instead); they were removed from it", ", ".join(_tags(args.negative_prompt)))
        args.negative_prompt = parsed_negative.text
    single = isinstance(prompts, str)
    parsed = [parse_prompt(p) for p in ([prompts] if single else prompts)]
    warn_skipped([tag for p in parsed for tag in p.skipped])
    firsts = [batch[0] for batch in batches(parsed, args.n_samples)]
    tags = firsts[0].loras
    if any(p.loras != tags for p in firsts[1:]):
        raise UserError("the prompts of different batches name different <lora:...> tags; as in A1111 the "
                        "first prompt of a batch sets them, but one run here applies one set: split the file")
    files = [(Path(path), weight, weight, Path(path).stem) for path, weight in args.lora or ()]
    if tags and args.lora_dir is None:
        raise UserError(f"the prompt names <lora:{tags[0].name}>; pass --lora-dir with the folder of LoRA files")
    from ldm.modules.lora import LoraMerger, find_lora_file, lora_use
    files += [(find_lora_file(t.name, args.lora_dir), t.text_encoder, t.unet, t.name) for t in tags]
    args.lora_merger, args.lora_hashes = None, None
    if files:
        from ldm.modules.lora.hashes import lora_short_hash
        merger = LoraMerger(model)
        merger.apply([lora_use(merger.load(path), te, unet) for path, te, unet, _ in files])
        args.lora_merger = merger
        # A1111 drops ':' and ',' from the names, which would break its "name: hash, ..." list
        args.lora_hashes = json.dumps(", ".join(f"{name.replace(':', '').replace(',', '')}: {lora_short_hash(path)}"
                                     for path, _, _, name in dict.fromkeys(files)),
                                      ensure_ascii=False)  # quoted, as A1111 quotes a value with ':' or ','

    texts = [p.text for p in parsed]
    return texts[0] if single else texts


def _tags(text):
    return [m.group(0) for m in TAG.finditer(text)]
