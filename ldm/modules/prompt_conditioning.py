"""Text conditioning for a sampler: per-step conditioning (prompt editing, alternation) and a conditional /
unconditional pair padded to the same number of 77-token chunks.

A sampler that runs ``steps`` steps asks ``ScheduledConditioning.at(i)`` for the conditioning of its step
``i`` (0 for the first denoising step). Long prompts give conditioning ``[B, 77 * chunks, D]``;
classifier-free guidance evaluates cond and uncond as one batch, so both must have the same number of
chunks: ``pad_to_same_length`` appends empty-prompt chunks to the shorter one, as A1111 does.
"""
import torch

from ldm.errors import UserError
from ldm.modules.prompt_parser import get_learned_conditioning_prompt_schedules


class ScheduledConditioning:
    """Conditioning that changes over the sampling steps: ``entries`` = [(end_step, cond), ...].

    ``cond`` (a ``[B, L, D]`` tensor for the whole batch) is used for the steps after the previous entry's
    ``end_step`` up to its own, counting steps from 1; ``end_step`` increases along the list.
    """

    def __init__(self, entries):
        entries = [(int(end), cond) for end, cond in entries]
        if not entries:
            raise ValueError("ScheduledConditioning needs at least one (end_step, cond) entry")
        ends = [end for end, _ in entries]
        if ends != sorted(set(ends)) or ends[0] < 1:
            raise ValueError(f"end steps must be increasing and >= 1, got {ends}")
        self.entries = entries

    @classmethod
    def constant(cls, cond, steps):
        return cls([(steps, cond)])

    def at(self, step_index):
        """Conditioning of sampling step ``step_index`` (0-based): the first entry with ``step_index < end_step``.

        So ``[a|b]`` gives a at step 0, b at step 1, ...; ``[a:b:3]`` gives a for steps 0-2. (A1111 compares
        its 0-based step with ``<=``, which holds each entry one step longer.) Steps past the last
        ``end_step`` (a sampler that runs more steps than the schedule was built for) use the last entry.
        """
        for end, cond in self.entries:
            if step_index < end:
                return cond
        return self.entries[-1][1]

    @property
    def is_constant(self):
        return len(self.entries) == 1

    def __len__(self):
        return len(self.entries)

    def __repr__(self):
        return f"ScheduledConditioning(end_steps={[end for end, _ in self.entries]})"


def _text_at(schedule, end_step):
    """The text of a prompt schedule ([[end, text], ...]) for the steps ending at ``end_step``."""
    return next(text for end, text in schedule if end_step <= end)


def scheduled_conditioning(model, prompts, steps, **prompt_options):
    """``ScheduledConditioning`` of a batch of ``prompts`` over ``steps`` sampling steps.

    ``model.get_learned_conditioning`` encodes the batch once per distinct set of texts (a plain batch:
    exactly one call, the same as encoding ``prompts`` directly). ``prompt_options`` (``emphasis``,
    ``clip_skip``, ``truncate``) are passed on to it.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps)
    ends = sorted({end for schedule in schedules for end, _ in schedule})
    encoded, entries = {}, []
    for end in ends:
        texts = tuple(_text_at(schedule, end) for schedule in schedules)
        if texts not in encoded:
            encoded[texts] = model.get_learned_conditioning(list(texts), **prompt_options)
        cond = encoded[texts]
        if entries and entries[-1][1] is cond:
            entries[-1] = (end, cond)  # consecutive steps with the same texts share one entry
        else:
            entries.append((end, cond))
    return ScheduledConditioning(entries)


def scheduled_conditioning_pair(model, prompts, negative_prompts, steps, **prompt_options):
    """(cond, uncond) ``ScheduledConditioning``s whose every entry has the same number of chunks.

    ``negative_prompts`` is one per prompt (the same prompt syntax applies). Shorter entries are padded
    with the conditioning of the empty prompt, so ``cond.at(i)`` and ``uncond.at(i)`` always concatenate.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negative_prompts = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise UserError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts; give one per prompt")
    cond = scheduled_conditioning(model, prompts, steps, **prompt_options)
    uncond = scheduled_conditioning(model, negative_prompts, steps, **prompt_options)
    length = max(c.shape[1] for schedule in (cond, uncond) for _, c in schedule.entries)
    if all(c.shape[1] == length for schedule in (cond, uncond) for _, c in schedule.entries):
        return cond, uncond
    empty = model.get_learned_conditioning([""], **prompt_options)
    return tuple(ScheduledConditioning([(end, pad_to_length(c, length, empty)) for end, c in schedule.entries])
                 for schedule in (cond, uncond))


def pad_to_length(cond, length, empty):
    """``cond`` ``[B, L, D]`` followed by copies of ``empty`` ``[1, l, D]`` (an empty prompt's chunk) up to
    ``length`` tokens."""
    missing = length - cond.shape[1]
    if missing == 0:
        return cond
    if missing < 0 or missing % empty.shape[1]:
        raise ValueError(f"cannot pad conditioning of length {cond.shape[1]} to {length} with "
                         f"{empty.shape[1]}-token chunks")
    padding = empty.to(cond).expand(cond.shape[0], -1, -1).repeat(1, missing // empty.shape[1], 1)
    return torch.cat([cond, padding], dim=1)


def pad_to_same_length(cond, uncond, empty):
    """(cond, uncond) with the shorter text conditioning padded by empty-prompt chunks (``empty``: the
    ``[1, 77, D]`` conditioning of ``""`` from the same encoder and options).

    Tensors ``[B, L, D]``, lists of them (pairwise), or dicts whose ``c_crossattn`` is padded (other
    entries, such as ``c_concat`` images, are left alone).
    """
    if isinstance(cond, dict):
        cond, uncond = dict(cond), dict(uncond)
        if "c_crossattn" in cond:
            cond["c_crossattn"], uncond["c_crossattn"] = pad_to_same_length(cond["c_crossattn"],
                                                                            uncond["c_crossattn"], empty)
        return cond, uncond
    if isinstance(cond, (list, tuple)):
        pairs = [pad_to_same_length(c, u, empty) for c, u in zip(cond, uncond)]
        return [c for c, _ in pairs], [u for _, u in pairs]
    length = max(cond.shape[1], uncond.shape[1])
    return pad_to_length(cond, length, empty), pad_to_length(uncond, length, empty)
