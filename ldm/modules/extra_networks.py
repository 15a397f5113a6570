"""A1111's extra-network tags in prompts: ``<lora:name>``, ``<lora:name:0.8>``, ``<lora:name:te:unet>``,
``<hypernet:name>``, ``<hypernet:name:0.8>``.

A tag is ``<kind:arg1:arg2...>`` (A1111's ``re_extra_net``: a word, a colon, then anything up to ``>``);
the arguments are split at ``:``, and an argument ``key=value`` is a named one (``<lora:name:te=0.5>``).
Every tag is taken out of the prompt text, whatever its kind, as A1111 does. ``lyco`` is A1111's alias
of ``lora``. Kinds we cannot apply (extensions' kinds) are dropped with a warning: A1111 skips
unknown kinds too (it logs them), so a prompt written for it still runs here.
"""
import logging
import re
from dataclasses import dataclass, field

from ldm.errors import UserError

log = logging.getLogger(__name__)

TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")
HYPERNET_KIND = "hypernet"


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: the file ``name`` and its text-encoder and U-Net multipliers."""
    name: str
    text_encoder: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class HypernetTag:
    """One ``<hypernet:...>`` tag: the file ``name`` and its multiplier."""
    name: str
    multiplier: float = 1.0


@dataclass
class ParsedPrompt:
    """A prompt with its tags taken out: ``text``, the ``loras`` and ``hypernets`` it names, the ``skipped``
    other tags."""
    text: str
    loras: list = field(default_factory=list)
    hypernets: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def parse_prompt(prompt):
    """The :class:`ParsedPrompt` of ``prompt``: every tag removed from the text (nothing else changes)."""
    parsed = ParsedPrompt(text="")

    def take(match):
        kind, args = match.group(1), match.group(2)
        if kind in LORA_KINDS:
            parsed.loras.append(lora_tag(match.group(0), args.split(":")))
        elif kind == HYPERNET_KIND:
            parsed.hypernets.append(hypernet_tag(match.group(0), args.split(":")))
        else:
            parsed.skipped.append(match.group(0))
        return ""

    parsed.text = TAG.sub(take, prompt)
    return parsed


def lora_tag(tag, items):
    """A1111's reading of a lora tag's arguments: name, then the text-encoder multiplier (default 1, or
    ``te=``), then the U-Net multiplier (default the text encoder's, or ``unet=``); ``dyn`` is ignored."""
    positional, named = [], {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise UserError(f"prompt tag '{tag}' names no LoRA; write <lora:name> or <lora:name:weight>")
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except ValueError:
        raise UserError(f"prompt tag '{tag}': the multipliers must be numbers, as in <lora:name:0.8> or "
                        f"<lora:name:0.5:1>") from None
    return LoraTag(positional[0], te, unet)


def hypernet_tag(tag, items):
    """A1111's reading of a hypernet tag's arguments: the name, then the multiplier (default 1); the rest is
    ignored. Unlike lora tags, ``key=value`` arguments are not named ones: A1111 reads them by position."""
    if not items[0]:
        raise UserError(f"prompt tag '{tag}' names no hypernetwork; write <hypernet:name> or <hypernet:name:weight>")
    try:
        multiplier = float(items[1]) if len(items) > 1 else 1.0
    except ValueError:
        raise UserError(f"prompt tag '{tag}': the multiplier must be a number, as in <hypernet:name:0.8>") from None
    return HypernetTag(items[0], multiplier)


def warn_skipped(skipped, where="prompt"):
    for tag in dict.fromkeys(skipped):
        log.warning("%s tag '%s' is not supported (only <lora:...> and <hypernet:...>); it was removed from the %s",
                    where.capitalize(), tag, where)
