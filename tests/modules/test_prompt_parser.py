"""A1111 prompt syntax. Every expected value below is worked out by hand from the rules in the module
docstring (x1.1 per round bracket, /1.1 per square bracket, explicit weights, escapes, BREAK; prompt
editing and alternation schedules), not recorded from the code."""
import pytest

from ldm.errors import UserError
from ldm.modules.prompt_parser import (
    get_learned_conditioning_prompt_schedules,
    parse_prompt_attention,
    parse_prompt_segments,
)

ATTENTION_CASES = {
    "plain": ("a photo of a cat", [["a photo of a cat", 1.0]]),
    "empty": ("", [["", 1.0]]),
    "explicit weight": ("(a:1.3)", [["a", 1.3]]),
    "explicit weight with spaces": ("(a: 1.5 )", [["a", 1.5]]),
    "negative weight": ("x (a:-1)", [["x ", 1.0], ["a", -1.0]]),
    "round": ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    "double round": ("((a))", [["a", 1.1 * 1.1]]),
    "square": ("[a]", [["a", 1 / 1.1]]),
    "double square": ("[[a]]", [["a", 1 / 1.1 / 1.1]]),
    "weight inside round": ("((a:1.5))", [["a", 1.5 * 1.1]]),
    "square inside round": ("(a [b])", [["a ", 1.1], ["b", 1 / 1.1 * 1.1]]),
    "mixed": ("a (b:1.3) [c]", [["a ", 1.0], ["b", 1.3], [" ", 1.0], ["c", 1 / 1.1]]),
    "equal neighbours merge": ("(a)(b)", [["ab", 1.1]]),
    "escaped brackets": (r"\(a\) \[b\]", [["(a) [b]", 1.0]]),
    "escape inside brackets": (r"(\(a\))", [["(a)", 1.1]]),
    "escaped backslash": (r"a\\b", [["a\\b", 1.0]]),
    "lone backslash dropped": (r"a\b", [["ab", 1.0]]),
    "unclosed round reaches the end": ("a (b c", [["a ", 1.0], ["b c", 1.1]]),
    "unclosed square reaches the end": ("a [b", [["a ", 1.0], ["b", 1 / 1.1]]),
    "unclosed outer round": ("((a)", [["a", 1.1 * 1.1]]),
    "stray closers are text": ("a) b]", [["a) b]", 1.0]]),
    "colon is text": ("a:b", [["a:b", 1.0]]),
    "colon without number in round": ("(a:b)", [["a:b", 1.1]]),
    "malformed weight is text": ("(a:1.2.3)", [["a:1.2.3", 1.1]]),
    "weight on square bracket is text": ("[a:1.5]", [["a:1.5", 1 / 1.1]]),
    "BREAK": ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    "BREAK needs word boundaries": ("aBREAK b", [["aBREAK b", 1.0]]),
    "lower-case break is a word": ("a break b", [["a break b", 1.0]]),
    "BREAK inside brackets still breaks": ("(a BREAK b)", [["a", 1.1], ["BREAK", -1], ["b", 1.1]]),
    "two BREAKs": ("a BREAK BREAK b", [["a", 1.0], ["BREAK", -1], ["", 1.0], ["BREAK", -1], ["b", 1.0]]),
    # A1111's own documentation example: "(((house:1.3))" leaves its first "(" open to the end of the prompt
    "A1111 example": ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                      [["a ", 1.0], ["house", 1.3 * 1.1 * 1.1], [" ", 1.1], ["on", 1 / 1.1 * 1.1], [" a ", 1.1],
                       ["hill", 0.5 * 1.1], [", sun, ", 1.1], ["sky", 1.1 ** 4], [".", 1.1]]),
}


@pytest.mark.parametrize("prompt, expected", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_parse_prompt_attention(prompt, expected):
    parsed = parse_prompt_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in parsed)  # A1111's return shape


def test_break_segments_are_flagged_not_guessed_from_text():
    # "BRE" + "AK" merge into the text "BREAK" with weight -1; only a real BREAK is flagged
    segments = parse_prompt_segments("(BRE(AK:1):-1) BREAK x")
    assert [(s.text, s.is_break) for s in segments] == [("BREAK", False), ("", False), ("", True), ("x", False)]
    assert segments[0].weight == pytest.approx(-1.0)


SCHEDULE_CASES = {
    "plain": ("a cat", 10, [[10, "a cat"]]),
    "edit at a step count": ("a [cat:dog:4]", 10, [[4, "a cat"], [10, "a dog"]]),
    "edit at a fraction": ("a [cat:dog:0.25]", 10, [[2, "a cat"], [10, "a dog"]]),  # int(2.5)
    "fraction with leading point": ("a [cat:dog:.5]", 10, [[5, "a cat"], [10, "a dog"]]),
    "1.0 is the whole run": ("[cat:dog:1.0]", 10, [[10, "cat"]]),
    "count past the end": ("[cat:dog:20]", 10, [[10, "cat"]]),
    "zero": ("[cat:dog:0]", 10, [[10, "dog"]]),
    "add later": ("a [dog:3]", 10, [[3, "a "], [10, "a dog"]]),
    "add later, spaced number": ("a [dog: 3 ]", 10, [[3, "a "], [10, "a dog"]]),
    "remove later": ("a [cat::3]", 10, [[3, "a cat"], [10, "a "]]),
    "emphasis kept for the encoder": ("[(cat:1.2):dog:5]", 10, [[5, "(cat:1.2)"], [10, "dog"]]),
    "brackets around an edit kept": ("(a) [b:c:5]", 10, [[5, "(a) b"], [10, "(a) c"]]),
    "nested edits": ("a[b:[c:d:6]:3]e", 10, [[3, "abe"], [6, "ace"], [10, "ade"]]),
    "two edits": ("[a:b:2] [c:d:0.5]", 10, [[2, "a c"], [5, "b c"], [10, "b d"]]),
    "alternation": ("[a|b]", 4, [[1, "a"], [2, "b"], [3, "a"], [4, "b"]]),
    "three-way alternation": ("[a|b|c] x", 4, [[1, "a x"], [2, "b x"], [3, "c x"], [4, "a x"]]),
    "empty alternative": ("[fe|]male", 3, [[1, "female"], [2, "male"], [3, "female"]]),
    "alternation with an edit": ("[a|b] [c:d:2]", 3, [[1, "a c"], [2, "b c"], [3, "a d"]]),
    "unbalanced edit is text": ("a [b:c:5", 10, [[10, "a [b:c:5"]]),
    "word after the number is text": ("[a:b:3 x]", 10, [[10, "[a:b:3 x]"]]),
    "stray brackets around an edit": ("((a][:b [d:3]", 10, [[3, "((a][:b "], [10, "((a][:b d"]]),
    "pipe outside alternation: prompt kept whole": ("a | b [c:d:5]", 10, [[10, "a | b [c:d:5]"]]),
}


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_CASES.values(), ids=SCHEDULE_CASES.keys())
def test_prompt_schedules(prompt, steps, expected):
    assert get_learned_conditioning_prompt_schedules([prompt], steps) == [expected]


def test_schedules_per_prompt_in_order_with_repeats():
    schedules = get_learned_conditioning_prompt_schedules(["[a:b:1]", "c", "[a:b:1]"], 2)
    assert schedules == [[[1, "a"], [2, "b"]], [[2, "c"]], [[1, "a"], [2, "b"]]]
    schedules[0][0][1] = "changed"  # each prompt gets its own lists
    assert schedules[2][0][1] == "a"


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_schedule_steps_must_be_a_positive_integer(steps):
    with pytest.raises(UserError, match="steps"):
        get_learned_conditioning_prompt_schedules(["a"], steps)


def test_schedule_prompts_must_be_a_list():
    with pytest.raises(UserError, match="list"):
        get_learned_conditioning_prompt_schedules("a [b:c:1]", 3)
