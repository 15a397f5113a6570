"""Chunked, emphasis-weighted prompt encoding on tiny random-weight text encoders.

"Official" below means the encoder's output as it was computed before chunking and emphasis existed: the
official tokenizer row (first 75 tokens, padded to 77) through the same network, built here from the
network's own parts."""
import pytest
import torch

from ldm.errors import UserError
from ldm.modules.encoders.modules import CLIPTokenTransformerEmbedder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.prompt_chunks import EmbeddingOverride
from ldm.modules.encoders.prompt_encoder import apply_emphasis, embedding_overrides
from ldm.modules.encoders.tokenizer import load_bpe
from tiny_models import with_random_layer_norms

TINY_HF_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    projection_dim=32)
TINY_OPENCLIP = {"embed_dim": 32, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                               "heads": 4, "layers": 3}}
PLAIN = ["a photo of a cat", "An ASTRONAUT riding a horse, on Mars!!", ""]
HUNDRED_TOKENS = " ".join(["cat", "dog"] * 50)  # one token per word
CAT, DOG = load_bpe()[0]["cat</w>"], load_bpe()[0]["dog</w>"]


# the encoders default to the official behaviour; these tests look at A1111's, as generation asks for it
A1111 = dict(emphasis="original", truncate=False)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return with_random_layer_norms(FrozenCLIPEmbedder(text_config=TINY_HF_TEXT, **A1111))


@pytest.fixture(scope="module")
def openclip():
    torch.manual_seed(0)
    return with_random_layer_norms(FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate", **A1111))


@pytest.fixture(scope="module")
def trainable():
    torch.manual_seed(0)
    return with_random_layer_norms(CLIPTokenTransformerEmbedder(n_embed=32, n_layer=2, n_head=4, **A1111)).eval()


def official_clip(encoder, texts, truncated_tokens=None):
    tokens = encoder.tokenizer(texts) if truncated_tokens is None else truncated_tokens
    return encoder.transformer(input_ids=tokens, position_ids=torch.arange(77)[None]).last_hidden_state


def official_openclip(encoder, texts):
    return encoder.encode_with_transformer(encoder.tokenizer(texts))


def official_trainable(encoder, texts):
    x = encoder.token_embedding(encoder.tokenizer(texts)) + encoder.positional_embedding
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_final(x)


@pytest.fixture(params=["clip", "openclip", "trainable"])
def encoder_and_official(request):
    official = {"clip": official_clip, "openclip": official_openclip, "trainable": official_trainable}
    return request.getfixturevalue(request.param), official[request.param]


# --- official numerics for plain prompts ---------------------------------------------------------------------

@torch.no_grad()
def test_plain_prompts_give_exactly_the_official_conditioning(encoder_and_official):
    encoder, official = encoder_and_official
    expected = official(encoder, PLAIN)
    for emphasis in ("original", "no-norm", "none"):
        assert torch.equal(encoder(PLAIN, emphasis=emphasis), expected)
    assert torch.equal(encoder.encode(PLAIN[0]), official(encoder, PLAIN[:1]))


@torch.no_grad()
def test_plain_row_beside_an_emphasized_row_is_untouched(clip):
    z = clip(["a photo of a cat", "a photo of a (dog:1.4)"])
    reference = official_clip(clip, ["a photo of a cat", "a photo of a dog"])  # same tokens, same batch
    assert torch.equal(z[0], reference[0])
    assert not torch.allclose(z[1], reference[1])


# --- emphasis -----------------------------------------------------------------------------------------------

@torch.no_grad()
def test_emphasis_original_weights_tokens_and_restores_the_mean(encoder_and_official):
    encoder, official = encoder_and_official
    plain = official(encoder, ["a cat on a mat", "a dog"])  # the tokens of the prompts below
    z = encoder(["a (cat:1.5) on a [mat]", "a dog"])
    weights = torch.ones(2, 77)
    weights[0, 2], weights[0, 5] = 1.5, 1 / 1.1  # start, a, cat, on, a, mat
    weighted = plain * weights[..., None]
    expected = weighted * (plain.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    assert torch.allclose(z, expected, atol=1e-6)
    assert plain[0].mean().abs() > 0.1  # a mean worth restoring
    assert torch.allclose(z[0].mean(), plain[0].mean(), atol=1e-6)  # the mean is restored
    assert not torch.allclose(weighted[0].mean(), plain[0].mean(), atol=1e-3)
    assert not torch.allclose(z[0], plain[0], atol=1e-3)
    assert torch.equal(z[1], plain[1])


@torch.no_grad()
def test_emphasis_no_norm_only_multiplies(clip):
    plain = official_clip(clip, ["a cat"])
    z = clip("a (cat:1.5)", emphasis="no-norm")
    expected = plain.clone()
    expected[0, 2] *= 1.5
    assert torch.allclose(z, expected, atol=1e-6)
    assert not torch.allclose(z, clip("a (cat:1.5)"), atol=1e-4)  # "original" rescales as well


@torch.no_grad()
def test_emphasis_none_encodes_the_text_literally(clip):
    literal = "a (cat:1.5) BREAK [dog]"
    assert torch.equal(clip(literal, emphasis="none"), official_clip(clip, [literal]))
    assert clip(literal).shape == (1, 154, 32)  # parsed: BREAK makes two chunks


def test_apply_emphasis_leaves_a_zero_mean_row_finite():
    z = torch.tensor([[[2.0], [-1.0]]])  # weights 0.5, 1 give [1, -1]: mean 0, nothing to rescale
    out = apply_emphasis(z, torch.tensor([[0.5, 1.0]]), "original")
    assert torch.equal(out, torch.tensor([[[1.0], [-1.0]]]))


@pytest.mark.parametrize("options, match", [(dict(emphasis="strong"), "emphasis"), (dict(clip_skip=0), "clip_skip"),
                                            (dict(clip_skip="2"), "clip_skip"), (dict(truncate="yes"), "truncate")])
def test_bad_prompt_options_are_user_errors(clip, options, match):
    with pytest.raises(UserError, match=match):
        clip("a cat", **options)
    with pytest.raises(UserError, match=match):
        CLIPTokenTransformerEmbedder(n_embed=32, n_layer=2, n_head=4, **options)


# --- long prompts ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_long_prompt_is_encoded_in_chunks_not_truncated(encoder_and_official):
    encoder, official = encoder_and_official
    words = HUNDRED_TOKENS.split()
    z = encoder(HUNDRED_TOKENS)
    assert z.shape == (1, 154, 32)
    # each chunk is encoded alone, with its own start/end tokens and padding
    assert torch.allclose(z[:, :77], official(encoder, [" ".join(words[:75])]), atol=1e-6)
    assert torch.allclose(z[:, 77:], official(encoder, [" ".join(words[75:])]), atol=1e-6)


@torch.no_grad()
def test_truncate_keeps_the_official_77_token_behaviour(encoder_and_official):
    encoder, official = encoder_and_official
    z = encoder(HUNDRED_TOKENS, truncate=True)
    assert z.shape == (1, 77, 32)
    assert torch.equal(z, official(encoder, [HUNDRED_TOKENS]))


@torch.no_grad()
def test_batch_pads_shorter_prompts_with_empty_chunks(clip):
    z = clip([HUNDRED_TOKENS, "a cat"])
    assert z.shape == (2, 154, 32)
    assert torch.allclose(z[1:, :77], official_clip(clip, ["a cat"]), atol=1e-6)
    assert torch.allclose(z[1:, 77:], official_clip(clip, [""]), atol=1e-6)


@torch.no_grad()
def test_break_encodes_each_part_alone(clip):
    z = clip("a cat BREAK a dog")
    assert z.shape == (1, 154, 32)
    assert torch.allclose(z[:, :77], official_clip(clip, ["a cat"]), atol=1e-6)
    assert torch.allclose(z[:, 77:], official_clip(clip, ["a dog"]), atol=1e-6)


def test_trainable_encoder_learns_through_chunks_and_emphasis():
    torch.manual_seed(0)
    encoder = CLIPTokenTransformerEmbedder(n_embed=32, n_layer=2, n_head=4, **A1111)
    z = encoder([HUNDRED_TOKENS, "(a red:1.3) car"])
    assert z.shape == (2, 154, 32)
    z.pow(2).mean().backward()
    assert encoder.token_embedding.weight.grad[DOG].abs().sum() > 0  # "dog" appears only in the second chunk
    assert all(p.grad is not None for p in encoder.parameters())


# --- clip skip ------------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_is_hidden_state_minus_n_through_the_final_layer_norm(clip, clip_skip):
    tokens = clip.tokenizer(PLAIN)
    out = clip.transformer(input_ids=tokens, position_ids=torch.arange(77)[None], output_hidden_states=True)
    expected = clip.transformer.text_model.final_layer_norm(out.hidden_states[-clip_skip])
    assert torch.equal(clip(PLAIN, clip_skip=clip_skip), expected)
    skipping = FrozenCLIPEmbedder(text_config=TINY_HF_TEXT, clip_skip=clip_skip)
    skipping.load_state_dict(clip.state_dict())
    assert skipping.clip_skip == clip_skip and torch.equal(skipping(PLAIN), expected)
    assert torch.equal(skipping(PLAIN, clip_skip=1), clip(PLAIN))


@torch.no_grad()
def test_clip_skip_on_layer_hidden_counts_from_layer_idx(clip):
    hidden = FrozenCLIPEmbedder(text_config=TINY_HF_TEXT, layer="hidden", layer_idx=-1)
    hidden.load_state_dict(clip.state_dict())
    tokens = clip.tokenizer(PLAIN)
    out = clip.transformer(input_ids=tokens, position_ids=torch.arange(77)[None], output_hidden_states=True)
    assert torch.equal(hidden(PLAIN), out.hidden_states[-1])
    assert torch.equal(hidden(PLAIN, clip_skip=2), out.hidden_states[-2])


@pytest.mark.parametrize("make, clip_skip", [
    (lambda: FrozenCLIPEmbedder(text_config=TINY_HF_TEXT), 4),  # 3 layers
    (lambda: FrozenCLIPEmbedder(text_config=TINY_HF_TEXT, layer="pooled"), 2),
    (lambda: FrozenCLIPEmbedder(text_config=TINY_HF_TEXT, layer="hidden", layer_idx=1), 2),
    (lambda: FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate"), 3),  # 3 blocks
    (lambda: CLIPTokenTransformerEmbedder(n_embed=32, n_layer=2, n_head=4), 3),
], ids=["clip-last", "clip-pooled", "clip-hidden", "openclip", "trainable"])
def test_clip_skip_past_the_first_layer_is_user_error(make, clip_skip):
    encoder = make()
    with pytest.raises(UserError, match="clip_skip"):
        encoder("a cat", clip_skip=clip_skip)


def open_clip_blocks_reference(model, tokens, n_blocks):
    """ln_final of block ``n_blocks``'s output, via open_clip's own transformer and causal mask."""
    x = model.token_embedding(tokens) + model.positional_embedding
    _, intermediates = model.transformer.forward_intermediates(x, attn_mask=model.attn_mask, indices=[n_blocks - 1])
    return model.ln_final(intermediates[0])


@torch.no_grad()
def test_openclip_clip_skip_counts_from_the_configured_layer(openclip):
    tokens = openclip.tokenizer(PLAIN)
    # "penultimate" on 3 blocks runs 2 blocks; clip skip 2 runs 1
    assert torch.allclose(openclip(PLAIN), open_clip_blocks_reference(openclip.model, tokens, 2), atol=1e-5)
    assert torch.allclose(openclip(PLAIN, clip_skip=2), open_clip_blocks_reference(openclip.model, tokens, 1),
                          atol=1e-5)
    last = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="last", clip_skip=2)
    last.load_state_dict(openclip.state_dict())
    assert torch.equal(last(PLAIN), openclip(PLAIN))  # last + skip 2 = penultimate


@torch.no_grad()
def test_trainable_clip_skip_runs_fewer_blocks(trainable):
    x = trainable.token_embedding(trainable.tokenizer(PLAIN)) + trainable.positional_embedding
    expected = trainable.ln_final(trainable.blocks[0](x))
    assert torch.equal(trainable(PLAIN, clip_skip=2), expected)


# --- textual-inversion overrides ----------------------------------------------------------------------------------

@torch.no_grad()
def test_embedding_override_replaces_input_embeddings(encoder_and_official):
    encoder, official = encoder_and_official
    layer = encoder.token_embedding_layer()
    dog_vector = layer.weight[DOG][None]  # [1, D]
    cat_tokens = encoder.tokenizer(["a cat", "a cat"])
    with embedding_overrides(layer, [[EmbeddingOverride(2, dog_vector)], []]):
        z = encoder.encode_tokens(cat_tokens, clip_skip=1)
    assert torch.allclose(z[0], official(encoder, ["a dog"])[0], atol=1e-6)
    assert torch.allclose(z[1], official(encoder, ["a cat"])[0], atol=1e-6)
    assert not layer._forward_hooks  # removed on exit
    too_narrow = [[EmbeddingOverride(2, torch.ones(1, 5))]]
    with pytest.raises(UserError, match="do not fit"), embedding_overrides(layer, too_narrow):
        encoder.encode_tokens(cat_tokens[:1], clip_skip=1)
