"""Per-step conditioning (prompt editing, alternation), cond/uncond padding, and the prompt options of
``LatentDiffusion.get_learned_conditioning``. Expected schedules are written by hand from the rules."""
import pytest
import torch

from ldm.errors import UserError
from ldm.modules.encoders.base import IdentityEncoder
from ldm.modules.prompt_conditioning import (
    ScheduledConditioning,
    pad_to_same_length,
    scheduled_conditioning,
    scheduled_conditioning_pair,
)
from tiny_models import build_tiny_model


class TextRecordingModel:
    """Stands in for a LatentDiffusion: "encodes" each text as a constant row that names it, 154 tokens
    long for texts containing "long", and records every call."""

    def __init__(self):
        self.calls, self.ids = [], {}

    def text_id(self, text):
        return self.ids.setdefault(text, float(len(self.ids)))

    def get_learned_conditioning(self, texts, **options):
        self.calls.append((list(texts), options))
        length = 154 if any("long" in t for t in texts) else 77
        return torch.stack([torch.full((length, 1), self.text_id(t)) for t in texts])

    def texts_of(self, cond):
        names = {v: k for k, v in self.ids.items()}
        return [names[row[0, 0].item()] for row in cond]


def test_at_uses_the_entry_whose_end_step_is_ahead():
    a, b = torch.zeros(1), torch.ones(1)
    schedule = ScheduledConditioning([(2, a), (10, b)])
    assert [schedule.at(i) is a for i in range(12)] == [True, True] + [False] * 10
    assert ScheduledConditioning.constant(a, 5).is_constant and len(schedule) == 2


@pytest.mark.parametrize("entries", [[], [(3, 0), (2, 1)], [(2, 0), (2, 1)], [(0, 0)]])
def test_scheduled_conditioning_needs_increasing_end_steps(entries):
    with pytest.raises(ValueError):
        ScheduledConditioning(entries)


def test_editing_and_alternation_over_the_steps():
    model = TextRecordingModel()
    schedule = scheduled_conditioning(model, ["a [cat:dog:2]", "[x|y]"], 4)
    # steps 0-1 "a cat" (the edit happens after 2 steps), then "a dog"; x, y, x, y
    expected = [["a cat", "x"], ["a cat", "y"], ["a dog", "x"], ["a dog", "y"]]
    assert [model.texts_of(schedule.at(i)) for i in range(4)] == expected
    assert [texts for texts, _ in model.calls] == expected  # one encoder call per step's batch of texts


def test_fraction_edit_shares_entries_and_repeated_texts_are_encoded_once():
    model = TextRecordingModel()
    schedule = scheduled_conditioning(model, ["[a:b:0.5]", "c"], 10, emphasis="none")
    assert [end for end, _ in schedule.entries] == [5, 10]
    assert [model.texts_of(schedule.at(i)) for i in (0, 4, 5, 9)] == [["a", "c"], ["a", "c"], ["b", "c"], ["b", "c"]]
    assert model.calls == [(["a", "c"], {"emphasis": "none"}), (["b", "c"], {"emphasis": "none"})]
    model = TextRecordingModel()
    schedule = scheduled_conditioning(model, ["[a|b]"], 6)
    assert [model.texts_of(schedule.at(i)) for i in range(6)] == [["a"], ["b"]] * 3
    assert len(model.calls) == 2


def test_plain_prompts_are_one_encoder_call_of_the_whole_batch():
    model = TextRecordingModel()
    schedule = scheduled_conditioning(model, ["a cat", "a cat", "(a dog:1.2)"], 50)
    assert schedule.is_constant and model.calls == [(["a cat", "a cat", "(a dog:1.2)"], {})]


def test_pair_pads_every_entry_with_empty_prompt_chunks():
    model = TextRecordingModel()
    cond, uncond = scheduled_conditioning_pair(model, ["a long [cat:dog:1]"], ["[blurry:2]"], 3)
    for i in range(3):
        c, u = cond.at(i), uncond.at(i)
        assert c.shape == u.shape == (1, 154, 1)
    assert model.texts_of(cond.at(0)) == ["a long cat"] and model.texts_of(cond.at(1)) == ["a long dog"]
    # negative prompt: nothing for 2 steps, then "blurry"; its second chunk is the empty prompt's
    assert model.texts_of(uncond.at(1)) == [""] and model.texts_of(uncond.at(2)) == ["blurry"]
    assert torch.equal(uncond.at(2)[:, 77:], torch.full((1, 77, 1), model.text_id("")))
    with pytest.raises(UserError, match="one per prompt"):
        scheduled_conditioning_pair(model, ["a", "b"], ["c"], 3)


def test_pad_to_same_length_tensors_lists_and_dicts():
    empty = torch.full((1, 77, 2), -1.0)
    cond, uncond = torch.ones(2, 154, 2), torch.zeros(2, 77, 2)
    c, u = pad_to_same_length(cond, uncond, empty)
    assert c is cond and u.shape == (2, 154, 2)
    assert torch.equal(u[:, :77], uncond) and torch.equal(u[:, 77:], empty.expand(2, 77, 2))
    c, u = pad_to_same_length(uncond, cond, empty)  # either side may be the shorter one
    assert c.shape == (2, 154, 2) and u is cond
    image = torch.randn(2, 5, 8, 8)
    c, u = pad_to_same_length({"c_concat": [image], "c_crossattn": [cond]},
                              {"c_concat": [image], "c_crossattn": [uncond]}, empty)
    assert c["c_concat"][0] is image and u["c_concat"][0] is image
    assert c["c_crossattn"][0].shape == u["c_crossattn"][0].shape == (2, 154, 2)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to_same_length(torch.ones(1, 100, 2), torch.ones(1, 77, 2), empty)


# --- LatentDiffusion.get_learned_conditioning ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model()


@torch.no_grad()
def test_get_learned_conditioning_passes_prompt_options(tiny):
    plain = tiny.get_learned_conditioning(["a (cat:1.5)"])   # the encoder's default: official, literal
    assert torch.equal(tiny.get_learned_conditioning(["a (cat:1.5)"], emphasis=None, clip_skip=None), plain)
    assert torch.equal(plain, tiny.cond_stage_model(["a (cat:1.5)"], emphasis="none"))
    weighted = tiny.get_learned_conditioning(["a (cat:1.5)"], emphasis="original")
    assert not torch.allclose(weighted, plain)
    long = " ".join(["cat"] * 100)
    assert tiny.get_learned_conditioning([long], truncate=False).shape == (1, 154, 32)
    assert tiny.get_learned_conditioning([long]).shape == (1, 77, 32)
    with pytest.raises(UserError, match="clip_skip"):  # the tiny encoder has one block
        tiny.get_learned_conditioning(["a cat"], clip_skip=2)


@torch.no_grad()
def test_scheduled_conditioning_on_the_tiny_model(tiny):
    schedule = scheduled_conditioning(tiny, ["a [cat:dog:2]"], 4)
    assert torch.equal(schedule.at(1), tiny.get_learned_conditioning(["a cat"]))
    assert torch.equal(schedule.at(2), tiny.get_learned_conditioning(["a dog"]))


def test_prompt_options_are_refused_by_other_encoders():
    model = build_tiny_model()
    model.cond_stage_model = IdentityEncoder()
    x = torch.randn(1, 77, 32)
    assert model.get_learned_conditioning(x) is x
    assert model.get_learned_conditioning(x, emphasis=None) is x
    with pytest.raises(UserError, match="IdentityEncoder takes no prompt options \\(emphasis\\)"):
        model.get_learned_conditioning(x, emphasis="none")
