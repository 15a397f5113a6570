"""Prompt syntax of the AUTOMATIC1111 web UI: emphasis, BREAK, prompt editing and alternation.

Two independent parsers, both pure text (no model, no torch):

``parse_prompt_attention(text)`` reads emphasis and BREAK and returns ``[[text, weight], ...]``, the
name and return shape of A1111's ``modules/prompt_parser.py``:

==================  =========================================================================
``(words)``         weight x 1.1 (nested brackets multiply: ``((words))`` is 1.1 * 1.1 = 1.21)
``(words:1.3)``     weight x 1.3
``[words]``         weight / 1.1
``\\(`` ``\\)``     a literal bracket (also ``\\[``, ``\\]``, and ``\\\\`` for a backslash); any
                    other backslash is dropped
``BREAK``           (upper case, a word of its own) ends the current 75-token chunk:
                    ``["BREAK", -1]`` in the output
==================  =========================================================================

An opening bracket that is never closed applies to the rest of the prompt; a closing bracket with no
opener is literal text. Neighbouring pieces of equal weight are merged.

``get_learned_conditioning_prompt_schedules(prompts, steps)`` reads prompt editing and alternation
and returns, per prompt, ``[[end_step, text], ...]``: ``text`` is the prompt for the steps up to
``end_step`` (counted from 1) and after the previous entry's ``end_step``:

======================  =====================================================================
``[from:to:when]``      ``from`` for the first ``when`` steps, then ``to``; ``when`` with a
                        decimal point is a fraction of ``steps`` (``0.5`` = half), without one a
                        step count
``[to:when]``           nothing, then ``to`` after ``when`` steps
``[from::when]``        ``from``, removed after ``when`` steps
``[a|b|c]``             ``a`` at the first step, ``b`` at the second, ``c``, ``a``, ...
======================  =====================================================================

The texts it returns keep their emphasis syntax, so each goes through ``parse_prompt_attention``
when it is encoded. A prompt the schedule grammar cannot read (a ``|`` outside an alternation, a
trailing lone backslash) is kept whole for every step, as A1111 does.
"""
import re
from dataclasses import dataclass

from ldm.errors import UserError

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ["BREAK", -1]  # what parse_prompt_attention returns where a BREAK was

# One match per syntactic unit of the emphasis syntax, in priority order.
_ATTENTION_TOKEN = re.compile(r"""
    \\[()\[\]\\]                                  # an escaped bracket or backslash
  | \\                                            # any other backslash (dropped)
  | [(\[]                                         # an opening bracket
  | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)       # ":1.3)" closes a round bracket with that weight
  | [)\]]                                         # a closing bracket
  | [^\\()\[\]:]+                                 # text
  | :                                             # a colon that starts no weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass
class PromptSegment:
    """A piece of prompt text and its emphasis weight; ``is_break`` marks a BREAK (its text is empty)."""
    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_prompt_segments(text):
    """The emphasis parse of ``text`` as ``PromptSegment``s (what ``parse_prompt_attention`` returns as lists).

    Differs from A1111 in two corner cases, both crashes or accidents there: a BREAK inside brackets
    still breaks (A1111 multiplies the marker's -1 by the brackets' weight, after which it is no longer
    recognised and the word "break" is encoded with a negative weight), and a malformed weight such as
    ``(a:1.2.3)`` is read as text (A1111 raises ValueError).
    """
    segments = []
    round_starts, square_starts = [], []

    def multiply_from(start, multiplier):
        for segment in segments[start:]:
            if not segment.is_break:
                segment.weight *= multiplier

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            segments.append(PromptSegment(token[1:]))
        elif token == "(":
            round_starts.append(len(segments))
        elif token == "[":
            square_starts.append(len(segments))
        elif weight is not None and round_starts:
            multiply_from(round_starts.pop(), float(weight))
        elif token == ")" and round_starts:
            multiply_from(round_starts.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_starts:
            multiply_from(square_starts.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    segments.append(PromptSegment("", is_break=True))
                segments.append(PromptSegment(part))
    # unclosed brackets reach to the end of the prompt
    for start in round_starts:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_starts:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)
    if not segments:
        segments = [PromptSegment("")]
    merged = [segments[0]]
    for segment in segments[1:]:
        last = merged[-1]
        if not segment.is_break and not last.is_break and segment.weight == last.weight:
            last.text += segment.text
        else:
            merged.append(segment)
    return merged


def parse_prompt_attention(text):
    """``text`` -> ``[[text, weight], ...]`` with ``["BREAK", -1]`` for each BREAK (see the module docstring).

    >>> parse_prompt_attention("a (red:1.5) [cat]")
    [['a ', 1.0], ['red', 1.5], [' ', 1.0], ['cat', 0.9090909090909091]]
    """
    return [list(BREAK_MARKER) if s.is_break else [s.text, s.weight] for s in parse_prompt_segments(text)]


# ------------------------------------------------------------------------------- prompt editing schedules
# A hand-written parser for A1111's (lark) schedule grammar:
#
#   start:       (prompt | /[][():]/+)*          stray brackets and colons are allowed at the top level only
#   prompt:      (emphasized | scheduled | alternate | plain | WHITESPACE)*
#   emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled:   "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
#   alternate:   "[" prompt ("|" [prompt])+ "]"
#   plain:       /([^\\\[\]():|]|\\.)+/
#
# A parsed prompt is a list of nodes: str (kept verbatim, emphasis syntax included), list (a group,
# rendered as its nodes), _Scheduled and _Alternate.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_STRAY = "[]():"


@dataclass
class _Scheduled:
    before: list  # None when the prompt had no "from" part
    after: list
    when: str     # the number as written; resolved against the step count by _when_step


@dataclass
class _Alternate:
    options: list


def _parse_nested(text, i, top_level=False):
    """A ``prompt`` starting at ``i``: (nodes, end). Inside a group it stops at the first character no
    item can start with; at the top level a stray bracket or colon is plain text."""
    nodes = []
    while i < len(text):
        plain = _PLAIN.match(text, i)
        if plain:
            nodes.append(plain.group())
            i = plain.end()
            continue
        group = _parse_group(text, i) if text[i] in "([" else None
        if group is not None:
            node, i = group
            nodes.append(node)
        elif top_level and text[i] in _STRAY:
            nodes.append(text[i])
            i += 1
        else:
            break
    return nodes, i


def _parse_group(text, i):
    """An emphasized, scheduled or alternate group opening at ``text[i]``: (node, end), or None."""
    opener = text[i]
    first, j = _parse_nested(text, i + 1)
    following = text[j] if j < len(text) else ""
    if opener == "(":
        if following == ")":
            return ["(", *first, ")"], j + 1
        if following == ":":
            second, k = _parse_nested(text, j + 1)
            if k < len(text) and text[k] == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None
    if following == "]":
        return ["[", *first, "]"], j + 1
    if following == "|":
        options = [first]
        while j < len(text) and text[j] == "|":
            option, j = _parse_nested(text, j + 1)
            options.append(option)
        if j < len(text) and text[j] == "]":
            return _Alternate(options), j + 1
        return None
    if following == ":":
        when = _WHEN.match(text, j + 1)
        if when:
            return _Scheduled(None, first, when.group(1)), when.end()
        second, k = _parse_nested(text, j + 1)
        when = _WHEN.match(text, k + 1) if k < len(text) and text[k] == ":" else None
        if when:
            return _Scheduled(first, second, when.group(1)), when.end()
    return None


def _parse_schedule_syntax(text):
    """The node list of a whole prompt, or None where the grammar cannot read it ("|" outside an
    alternation, or a backslash ending the prompt)."""
    nodes, end = _parse_nested(text, 0, top_level=True)
    return nodes if end == len(text) else None


def _when_step(when, steps):
    """The step count a ``when`` stands for: with a decimal point a fraction of ``steps``, else a count."""
    value = float(when)
    if "." in when:
        value *= steps
    # clamped before int(): values below 1 all mean "never before", and int() of an infinite float raises
    return int(min(max(value, 0.0), steps))


def _walk(nodes):
    for node in nodes:
        yield node
        if isinstance(node, list):
            yield from _walk(node)
        elif isinstance(node, _Scheduled):
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _render(nodes, step, steps):
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, list):
            parts.append(_render(node, step, steps))
        elif isinstance(node, _Scheduled):
            chosen = node.before if step <= _when_step(node.when, steps) else node.after
            parts.append(_render(chosen or [], step, steps))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(parts)


def _prompt_schedule(prompt, steps):
    nodes = _parse_schedule_syntax(prompt)
    if nodes is None:
        return [[steps, prompt]]
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Scheduled):
            when = _when_step(node.when, steps)
            if when >= 1:
                ends.add(when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [[end, _render(nodes, end, steps)] for end in sorted(ends)]


def get_learned_conditioning_prompt_schedules(prompts, steps):
    """Per prompt, ``[[end_step, text], ...]``: ``text`` holds for the steps after the previous ``end_step``
    up to this one, counting steps from 1 (see the module docstring for the syntax).

    >>> get_learned_conditioning_prompt_schedules(["a [cat:dog:0.5]"], 10)
    [[[5, 'a cat'], [10, 'a dog']]]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(prompts, str):
        raise UserError("prompts must be a list of strings, got a single string")
    cache = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = _prompt_schedule(prompt, steps)
    return [[list(entry) for entry in cache[prompt]] for prompt in prompts]
