import json

import pytest
import torch

from ldm.errors import UserError
from ldm.modules.encoders.modules import (
    ClassEmbedder,
    CLIPBPETokenizer,
    CLIPTokenTransformerEmbedder,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    IdentityEncoder,
)
from ldm.modules.encoders.tokenizer import load_bpe
from official_manifests import state_dict_shapes

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", HF and open_clip agree
TINY_HF_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    projection_dim=32)
TINY_OPENCLIP = {"embed_dim": 32, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                               "heads": 4, "layers": 3}}
PROMPTS = ["a photo of a cat", "An ASTRONAUT riding a horse, on Mars!!"]
TRICKY = [
    "A PHOTO, of a CAT!!",
    "don't stop  believin'\tnow 123 4.5",
    "été naïve café 日本語 😀",
    "Tom &amp; Jerry",
    "a <b> &amp; c",  # ftfy leaves the entity alone next to '<'; only open_clip un-escapes it
    "",
    "x" * 300,
]
LONG_PROMPT = " ".join(f"word{i}" for i in range(100))


# --- tokenizer ---------------------------------------------------------------------------------------

def test_known_prompt_ids_for_both_pad_styles():
    sd1 = CLIPBPETokenizer(pad_token_id=49407)("a photo of a cat")
    sd2 = CLIPBPETokenizer(pad_token_id=0, unescape_html=True)(["a photo of a cat"])
    assert sd1.shape == sd2.shape == (1, 77) and sd1.dtype == torch.long
    assert sd1[0].tolist() == CAT_IDS + [49407] * 70
    assert sd2[0].tolist() == CAT_IDS + [0] * 70


def test_case_whitespace_and_punctuation():
    tok = CLIPBPETokenizer()
    assert tok.encode("A  PHOTO of a\nCat") == CAT_IDS[1:-1]
    assert tok.encode("cat!") == tok.encode("cat") + tok.encode("!")
    assert tok.encode("cat!") != tok.encode("cat")


def test_truncation_keeps_start_75_tokens_and_end():
    tok = CLIPBPETokenizer()
    content = tok.encode(LONG_PROMPT)
    assert len(content) > 75
    ids = tok(LONG_PROMPT)[0].tolist()
    assert ids == [49406] + content[:75] + [49407]


def test_matches_open_clip_tokenize():
    import open_clip

    texts = PROMPTS + TRICKY + [LONG_PROMPT]
    ours = CLIPBPETokenizer(pad_token_id=0, unescape_html=True)(texts)
    assert torch.equal(ours, open_clip.tokenize(texts))


def test_matches_huggingface_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    # Hugging Face's files for openai/clip-vit-large-patch14 are this vocabulary and merge list.
    vocab, ranks = load_bpe()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(ranks, key=ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = PROMPTS + TRICKY + [LONG_PROMPT]
    expected = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    assert torch.equal(CLIPBPETokenizer(pad_token_id=49407)(texts), expected)
    # the HTML flag is what separates the two reference tokenizers
    assert not torch.equal(CLIPBPETokenizer(pad_token_id=49407, unescape_html=True)(texts), expected)


# --- FrozenCLIPEmbedder (SD 1.x) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(device="cuda", text_config=TINY_HF_TEXT)


def test_clip_embedder_shapes_and_cpu_despite_cuda_device(tiny_hf):
    z = tiny_hf.encode(PROMPTS)
    assert z.shape == (2, 77, 32) and z.device.type == "cpu" and torch.isfinite(z).all()


def test_clip_embedder_is_frozen(tiny_hf):
    assert not tiny_hf.transformer.training
    assert not any(p.requires_grad for p in tiny_hf.parameters())


def test_clip_embedder_pooled_is_end_token_feature(tiny_hf):
    torch.manual_seed(0)
    pooled = FrozenCLIPEmbedder(layer="pooled", text_config=TINY_HF_TEXT)
    pooled.load_state_dict(tiny_hf.state_dict())
    last = tiny_hf(PROMPTS)
    z = pooled(PROMPTS)
    assert z.shape == (2, 1, 32)
    end = [tiny_hf.tokenizer(p)[0].tolist().index(49407) for p in PROMPTS]
    assert torch.allclose(z[:, 0], last[torch.arange(2), end], atol=1e-6)


def test_clip_embedder_hidden_layer_differs_from_last(tiny_hf):
    hidden = FrozenCLIPEmbedder(layer="hidden", layer_idx=-2, text_config=TINY_HF_TEXT)
    hidden.load_state_dict(tiny_hf.state_dict())
    z = hidden(PROMPTS)
    assert z.shape == (2, 77, 32)
    assert not torch.allclose(z, tiny_hf(PROMPTS))


@pytest.mark.parametrize("kwargs", [dict(version="openai/clip-vit-huge"), dict(layer="penultimate"),
                                    dict(layer="hidden"), dict(max_length=78)])
def test_clip_embedder_bad_config_is_user_error(kwargs):
    with pytest.raises(UserError):
        FrozenCLIPEmbedder(text_config=TINY_HF_TEXT, **kwargs)


def test_clip_embedder_full_size_keys_match_manifest():
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    expected = state_dict_shapes("v1-inference", "cond_stage_model.")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected
    assert len(shapes) == 196


# --- FrozenOpenCLIPEmbedder (SD 2.x) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_openclip():
    torch.manual_seed(0)
    return FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, device="cuda", layer="last")


def open_clip_reference(model, tokens, n_blocks):
    """ln_final of block ``n_blocks``'s output, via open_clip's own transformer and causal mask."""
    x = model.token_embedding(tokens) + model.positional_embedding
    _, intermediates = model.transformer.forward_intermediates(x, attn_mask=model.attn_mask,
                                                               indices=[n_blocks - 1])
    return model.ln_final(intermediates[0])


def test_openclip_embedder_shapes_and_cpu_despite_cuda_device(tiny_openclip):
    z = tiny_openclip.encode(PROMPTS)
    assert z.shape == (2, 77, 32) and z.device.type == "cpu" and torch.isfinite(z).all()
    assert not hasattr(tiny_openclip.model, "visual")
    assert not tiny_openclip.model.training
    assert not any(p.requires_grad for p in tiny_openclip.parameters())


def test_openclip_embedder_last_and_penultimate_match_open_clip(tiny_openclip):
    penultimate = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate")
    penultimate.load_state_dict(tiny_openclip.state_dict())
    tokens = tiny_openclip.tokenizer(PROMPTS)
    with torch.no_grad():
        last, pen = tiny_openclip(PROMPTS), penultimate(PROMPTS)
        assert torch.allclose(last, open_clip_reference(tiny_openclip.model, tokens, 3), atol=1e-5)
        assert torch.allclose(pen, open_clip_reference(tiny_openclip.model, tokens, 2), atol=1e-5)
    assert not torch.allclose(last, pen, atol=1e-3)


@pytest.mark.parametrize("kwargs", [dict(arch="ViT-Nope-1"), dict(layer="pooled"), dict(max_length=64)])
def test_openclip_embedder_bad_config_is_user_error(kwargs):
    with pytest.raises(UserError):
        FrozenOpenCLIPEmbedder(**{"arch": TINY_OPENCLIP, **kwargs})


def test_openclip_embedder_full_size_keys_match_manifest():
    with torch.device("meta"):
        model = FrozenOpenCLIPEmbedder(layer="penultimate")
    expected = state_dict_shapes("v2-inference", "cond_stage_model.")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected
    assert len(shapes) == 294
    assert model.model.positional_embedding.shape == (77, 1024)


# --- trainable encoder and small encoders ------------------------------------------------------------------

def test_trainable_encoder_shape_and_gradients():
    torch.manual_seed(0)
    encoder = CLIPTokenTransformerEmbedder(n_embed=32, n_layer=2, n_head=4)
    z = encoder.encode(PROMPTS)
    assert z.shape == (2, 77, 32)
    assert not torch.allclose(z[0], z[1])
    z.pow(2).mean().backward()
    for name, param in encoder.named_parameters():
        assert param.requires_grad and param.grad is not None, name
    assert encoder.token_embedding.weight.grad[320].abs().sum() > 0  # "a" appears in both prompts
    assert encoder.token_embedding.weight.grad[1000].abs().sum() == 0  # a token that appears in neither


def test_trainable_encoder_causal_prefix_ignores_later_tokens():
    torch.manual_seed(0)
    encoder = CLIPTokenTransformerEmbedder(n_embed=32, n_layer=2, n_head=4, causal=True)
    z = encoder(["a photo of a cat", "a photo of a dog"])
    assert torch.allclose(z[0, :5], z[1, :5], atol=1e-6)  # start + "a photo of a"
    assert not torch.allclose(z[0, 5], z[1, 5])


def test_trainable_encoder_token_local_outputs_ignore_neighbours():
    torch.manual_seed(0)
    encoder = CLIPTokenTransformerEmbedder(n_embed=32, n_layer=2, n_head=4, token_local=True)
    z = encoder(["a red circle", "a blue circle", "a red square"])
    assert torch.allclose(z[0, 3], z[1, 3], atol=1e-6)  # "circle" after a different colour
    assert torch.allclose(z[0, 2], z[2, 2], atol=1e-6)  # "red" before a different shape
    assert not torch.allclose(z[0, 2], z[1, 2])
    assert not torch.allclose(z[0, 3], z[2, 3])
    with pytest.raises(UserError, match="causal and token_local"):
        CLIPTokenTransformerEmbedder(n_embed=32, n_layer=1, n_head=4, causal=True, token_local=True)


def test_class_embedder_dropout_and_unconditional():
    torch.manual_seed(0)
    embedder = ClassEmbedder(embed_dim=8, n_classes=11, ucg_rate=1.0)
    batch = {"class": torch.tensor([0, 3, 7])}
    kept = embedder(batch, disable_dropout=True)
    assert kept.shape == (3, 1, 8)
    assert torch.equal(kept[:, 0], embedder.embedding.weight[[0, 3, 7]])
    dropped = embedder(batch)
    assert torch.equal(dropped[:, 0], embedder.embedding.weight[[10, 10, 10]].expand(3, 8))
    uc = embedder.get_unconditional_conditioning(4)
    assert uc["class"].tolist() == [10] * 4 and uc["class"].device.type == "cpu"
    assert torch.equal(embedder(uc, disable_dropout=True)[:, 0], embedder.embedding.weight[[10] * 4])


def test_identity_encoder_returns_input():
    x = torch.randn(2, 3)
    assert IdentityEncoder().encode(x) is x


# --- loading -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: FrozenCLIPEmbedder(layer="pooled", text_config=TINY_HF_TEXT),
    lambda: FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate"),
], ids=["clip", "openclip"])
def test_meta_built_encoder_works_after_assign_load(make):
    # position_ids / attn_mask are non-persistent buffers: after a meta build they never get real values
    torch.manual_seed(0)
    reference = make()
    with torch.device("meta"):
        model = make()
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert torch.allclose(model(PROMPTS), reference(PROMPTS))


def test_clip_embedder_strict_load_accepts_legacy_position_ids(tiny_hf):
    parent = torch.nn.Module()
    parent.cond_stage_model = FrozenCLIPEmbedder(text_config=TINY_HF_TEXT)
    state_dict = {f"cond_stage_model.{k}": v for k, v in tiny_hf.state_dict().items()}
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    parent.load_state_dict(state_dict, strict=True)
    assert torch.equal(parent.cond_stage_model(PROMPTS), tiny_hf(PROMPTS))


def test_openclip_embedder_takes_an_arch_written_in_yaml(tiny_openclip):
    """A config's ``arch:`` mapping arrives as an OmegaConf node; open_clip needs plain dicts inside."""
    from omegaconf import OmegaConf
    from_yaml = FrozenOpenCLIPEmbedder(arch=OmegaConf.create(TINY_OPENCLIP), layer="last")
    from_yaml.load_state_dict(tiny_openclip.state_dict())
    with torch.no_grad():
        assert torch.equal(from_yaml(PROMPTS), tiny_openclip(PROMPTS))
