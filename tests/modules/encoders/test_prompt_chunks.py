"""Prompt -> 75-token chunks, as the A1111 rules give them. Expected token rows are written out from the
rules (start, 75 content slots, end; comma backtracking within 20 tokens; BREAK; padding), using one-token
words so that every count is explicit."""
import pytest
import torch

from ldm.errors import UserError
from ldm.modules.encoders.prompt_chunks import (
    CHUNK_BREAK,
    TokenRun,
    chunk_prompt,
    finish_chunk,
    split_into_chunks,
)
from ldm.modules.encoders.tokenizer import BOS_TOKEN_ID as BOS, EOS_TOKEN_ID as EOS, CLIPBPETokenizer, load_bpe

VOCAB = load_bpe()[0]
CAT, DOG, COMMA = VOCAB["cat</w>"], VOCAB["dog</w>"], VOCAB[",</w>"]
SD1 = CLIPBPETokenizer(77, pad_token_id=EOS)
SD2 = CLIPBPETokenizer(77, pad_token_id=0, unescape_html=True)


def words(word, n):
    return " ".join([word] * n)


def row(content, pad=EOS):
    """A 77-token chunk row: start, content, end, padding."""
    assert len(content) <= 75
    return [BOS, *content, EOS] + [pad] * (75 - len(content))


def token_rows(chunks):
    return [c.token_ids for c in chunks]


def test_one_token_words():
    assert SD1.encode("cat") == [CAT] and SD1.encode("dog") == [DOG] and SD1.encode(",") == [COMMA]
    assert SD1.encode("cat, dog") == [CAT, COMMA, DOG]


def test_short_prompt_is_one_chunk_like_the_official_tokenizer():
    for tokenizer in (SD1, SD2):
        chunks = chunk_prompt("a photo of a cat", tokenizer)
        assert token_rows(chunks) == [tokenizer("a photo of a cat")[0].tolist()]
        assert chunks[0].weights == [1.0] * 77 and chunks[0].overrides == []
    assert token_rows(chunk_prompt("cat", SD2)) == [row([CAT], pad=0)]


def test_empty_prompt_is_one_empty_chunk():
    assert token_rows(chunk_prompt("", SD1)) == [row([])]


def test_75_tokens_fit_76_do_not():
    assert token_rows(chunk_prompt(words("cat", 75), SD1)) == [row([CAT] * 75)]
    assert token_rows(chunk_prompt(words("cat", 76), SD1)) == [row([CAT] * 75), row([CAT])]


def test_100_tokens_give_two_chunks_nothing_dropped():
    text = " ".join(["cat", "dog"] * 50)
    assert token_rows(chunk_prompt(text, SD1)) == [row([CAT, DOG] * 37 + [CAT]), row([DOG] + [CAT, DOG] * 12)]


def test_comma_within_20_tokens_of_the_boundary_ends_the_chunk():
    # 70 cats, comma (position 70), 10 dogs: the chunk fills at 75 = comma + 4 dogs; 75 - 70 = 5 <= 20,
    # so the 4 dogs move to the second chunk
    text = f"{words('cat', 70)}, {words('dog', 10)}"
    assert token_rows(chunk_prompt(text, SD1)) == [row([CAT] * 70 + [COMMA]), row([DOG] * 10)]


def test_comma_exactly_20_tokens_back_still_moves():
    text = f"{words('cat', 55)}, {words('dog', 30)}"  # comma at 55: 75 - 55 = 20
    assert token_rows(chunk_prompt(text, SD1)) == [row([CAT] * 55 + [COMMA]), row([DOG] * 30)]


def test_comma_21_tokens_back_does_not_move():
    text = f"{words('cat', 54)}, {words('dog', 30)}"  # comma at 54: 75 - 54 = 21
    assert token_rows(chunk_prompt(text, SD1)) == [row([CAT] * 54 + [COMMA] + [DOG] * 20), row([DOG] * 10)]


def test_comma_arriving_on_a_full_chunk_opens_the_next():
    text = f"{words('cat', 75)}, {words('dog', 5)}"
    assert token_rows(chunk_prompt(text, SD1)) == [row([CAT] * 75), row([COMMA] + [DOG] * 5)]


def test_only_the_last_comma_counts():
    # commas at 10 and 40; the chunk fills at 75; 75 - 40 = 35 > 20: no move
    text = f"{words('cat', 10)}, {words('cat', 29)}, {words('dog', 40)}"
    first = [CAT] * 10 + [COMMA] + [CAT] * 29 + [COMMA] + [DOG] * 34
    assert token_rows(chunk_prompt(text, SD1)) == [row(first), row([DOG] * 6)]


def test_break_starts_a_new_chunk():
    assert token_rows(chunk_prompt("cat BREAK dog", SD1)) == [row([CAT]), row([DOG])]
    assert token_rows(chunk_prompt("BREAK cat", SD1)) == [row([]), row([CAT])]
    assert token_rows(chunk_prompt("cat BREAK dog", SD1, emphasis="none")) == [row(SD1.encode("cat BREAK dog"))]


def test_weights_follow_tokens_and_chunks():
    chunks = chunk_prompt("(cat:1.5) dog [cat]", SD1)
    assert chunks[0].token_ids == row([CAT, DOG, CAT])
    assert chunks[0].weights == pytest.approx([1.0, 1.5, 1.0, 1 / 1.1] + [1.0] * 73)  # start, 3 tokens, end, 72 pads
    chunks = chunk_prompt(f"{words('cat', 70)}, ({words('dog', 10)}:1.2)", SD1)
    assert chunks[0].weights == pytest.approx([1.0] * 77)
    assert chunks[1].weights == pytest.approx([1.0] + [1.2] * 10 + [1.0] * 66)


def test_bracket_segments_are_tokenized_alone():
    assert token_rows(chunk_prompt("(cat)dog", SD1)) == [row([CAT, DOG])]
    assert token_rows(chunk_prompt("catdog", SD1)) != [row([CAT, DOG])]


def test_emphasis_none_takes_the_text_literally():
    chunks = chunk_prompt("(cat:1.5)", SD1, emphasis="none")
    assert token_rows(chunks) == [SD1("(cat:1.5)")[0].tolist()] and chunks[0].weights == [1.0] * 77


def test_truncate_keeps_the_first_75_tokens_like_the_official_tokenizer():
    text = f"{words('cat', 70)}, {words('dog', 10)}"  # would backtrack without truncation
    chunks = chunk_prompt(text, SD1, truncate=True)
    assert token_rows(chunks) == [row([CAT] * 70 + [COMMA] + [DOG] * 4)] == [SD1(text)[0].tolist()]
    long = " ".join(f"word{i}" for i in range(100))
    assert token_rows(chunk_prompt(long, SD2, truncate=True)) == [SD2(long)[0].tolist()]


def test_unknown_emphasis_is_user_error():
    with pytest.raises(UserError, match="emphasis"):
        chunk_prompt("cat", SD1, emphasis="strong")


# --- textual-inversion-style embedding runs --------------------------------------------------------------------

def test_embedding_run_is_never_split():
    vectors = torch.zeros(8, 4)
    contents = split_into_chunks([TokenRun([CAT] * 70), TokenRun([DOG] * 8, 1.2, vectors)])
    chunks = [finish_chunk(c) for c in contents]
    assert token_rows(chunks) == [row([CAT] * 70), row([DOG] * 8)]
    assert chunks[0].overrides == []
    assert [o.position for o in chunks[1].overrides] == [1] and chunks[1].overrides[0].vectors is vectors
    assert chunks[1].weights == pytest.approx([1.0] + [1.2] * 8 + [1.0] * 68)


def test_comma_backtracking_moves_embedding_runs_with_their_tokens():
    # 60 cats, comma (60), embedding (61..65), 20 cats: full at 75 after 9 cats; 75 - 60 = 15 <= 20
    vectors = torch.ones(5, 4)
    runs = [TokenRun([CAT] * 60 + [COMMA]), TokenRun([DOG] * 5, 1.0, vectors), TokenRun([CAT] * 20)]
    chunks = [finish_chunk(c) for c in split_into_chunks(runs)]
    assert token_rows(chunks) == [row([CAT] * 60 + [COMMA]), row([DOG] * 5 + [CAT] * 20)]
    assert chunks[0].overrides == [] and [o.position for o in chunks[1].overrides] == [1]


def test_embedding_after_break_and_in_the_middle():
    vectors = torch.ones(2, 4)
    runs = [TokenRun([CAT]), CHUNK_BREAK, TokenRun([CAT, CAT]), TokenRun([DOG, DOG], 1.0, vectors)]
    chunks = [finish_chunk(c) for c in split_into_chunks(runs)]
    assert token_rows(chunks) == [row([CAT]), row([CAT, CAT, DOG, DOG])]
    assert [o.position for o in chunks[1].overrides] == [3]


def test_embedding_longer_than_a_chunk_is_user_error():
    with pytest.raises(UserError, match="76 vectors"):
        split_into_chunks([TokenRun([DOG] * 76, 1.0, torch.zeros(76, 4))])
