"""Textual-inversion training through main.py on the tiny random-weight model: only the new vectors train, the
base stays bit for bit, the exported files have A1111's and kohya's layouts and load through our readers, and
a resumed run continues where it stopped."""
import hashlib

import pytest
import torch
from adapter_runs import adapter_config, train, train_and_resume
from safetensors import safe_open

from ldm.checkpoint import load_model
from ldm.errors import UserError
from ldm.models.personalise.textual_inversion import TextualInversion
from ldm.modules.encoders.embeddings import (
    Embedding,
    EmbeddingSet,
    load_embeddings,
    read_embedding_file,
    use_embeddings,
)
from ldm.modules.encoders.modules import (
    CLIPTokenTransformerEmbedder,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
)
from ldm.modules.encoders.tokenizer import CLIPBPETokenizer
from ldm.modules.freeze import freeze_module

TOKEN, INIT_WORD, N_VECTORS, WIDTH = "cyan", "blue", 2, 32
A1111_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def ti_config(tiny_files, **params):
    return adapter_config(tiny_files, "ldm.models.personalise.textual_inversion.TextualInversion", 5e-3,
                          {"concept": "colour", "word": TOKEN},
                          **{"token": TOKEN, "init_word": INIT_WORD, "n_vectors": N_VECTORS, **params})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, tiny_files):
    """Train 3 steps, keeping the module main.py built, then resume the run up to step 5."""
    folder = tmp_path_factory.mktemp("ti")
    config = tiny.write_config(ti_config(tiny_files), folder / "tiny-ti.yaml")
    return train_and_resume(TextualInversion, config, folder / "logs", "ti")


def initial_vectors(tiny_files):
    """The token embedding of "blue" in the base weights, once per vector."""
    table = tiny_files.state_dict["cond_stage_model.token_embedding.weight"]
    (blue,) = CLIPBPETokenizer().encode(INIT_WORD)
    return table[blue].expand(N_VECTORS, -1)


def test_checkpoints_hold_only_the_vectors_and_they_train(trained, tiny_files):
    for ckpt in (trained["first"], trained["resumed"]):
        assert list(ckpt["state_dict"]) == ["vectors"]
        assert ckpt["state_dict"]["vectors"].shape == (N_VECTORS, WIDTH)
        (state,) = ckpt["optimizer_states"][0]["state"].values()
        assert state["exp_avg"].shape == (N_VECTORS, WIDTH)  # the optimizer holds the vectors and nothing else
    assert not torch.equal(trained["first"]["state_dict"]["vectors"], initial_vectors(tiny_files))
    assert not torch.equal(trained["resumed"]["state_dict"]["vectors"], trained["first"]["state_dict"]["vectors"])


def test_base_weights_are_bit_identical_after_training(trained, tiny_files):
    base = trained["module"].base
    own = base.state_dict()
    assert all(torch.equal(own[key], value) for key, value in tiny_files.state_dict.items())
    assert not any(p.requires_grad for p in base.parameters())
    assert not base.training


def test_resume_continues_the_run(trained):
    assert trained["first"]["global_step"] == 3 and trained["resumed"]["global_step"] == 5
    (first,) = trained["first"]["optimizer_states"][0]["state"].values()
    (resumed,) = trained["resumed"]["optimizer_states"][0]["state"].values()
    assert int(first["step"]) == 3 and int(resumed["step"]) == 5  # Adam's moments went on, not restarted


def test_a1111_pt_layout(trained, tiny_files):
    data = torch.load(trained["run"] / "adapters" / "pt" / f"{TOKEN}.pt", weights_only=True)
    assert set(data) == A1111_KEYS
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    vectors = data["string_to_param"]["*"]
    assert vectors.dtype == torch.float32 and vectors.shape == (N_VECTORS, WIDTH)
    assert torch.equal(vectors, trained["resumed"]["state_dict"]["vectors"])
    assert data["name"] == TOKEN and data["step"] == 5
    assert data["sd_checkpoint"] == hashlib.sha256(tiny_files.safetensors.read_bytes()).hexdigest()[:10]
    assert data["sd_checkpoint_name"] == tiny_files.safetensors.stem


def test_safetensors_layout(trained):
    with safe_open(str(trained["run"] / "adapters" / "safetensors" / f"{TOKEN}.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        vectors = f.get_tensor("emb_params")
    assert vectors.dtype == torch.float32
    assert torch.equal(vectors, trained["resumed"]["state_dict"]["vectors"])


def test_both_exports_load_through_our_readers_to_the_same_vectors(trained):
    adapters = trained["run"] / "adapters"
    pt, st = read_embedding_file(adapters / "pt" / f"{TOKEN}.pt"), read_embedding_file(
        adapters / "safetensors" / f"{TOKEN}.safetensors")
    assert pt.name == st.name == TOKEN and pt.step == 5
    assert torch.equal(pt.vectors, st.vectors)
    for folder in ("pt", "safetensors"):
        found = load_embeddings(adapters / folder)
        assert list(found.embeddings) == [TOKEN] and not found.refused
        assert torch.equal(found.embeddings[TOKEN].vectors, pt.vectors)


@torch.no_grad()
def test_loaded_embedding_conditions_exactly_as_in_training(trained, tiny_files):
    module = trained["module"]
    prompt = f"a large {TOKEN} circle on the left"
    with module.attached():
        in_training = module.base.get_learned_conditioning([prompt])
    model = load_model(tiny_files.config, tiny_files.safetensors, device="cpu")
    use_embeddings(model, trained["run"] / "adapters" / "pt")
    assert torch.equal(model.get_learned_conditioning([prompt]), in_training)
    use_embeddings(model, None)
    assert not torch.equal(model.get_learned_conditioning([prompt]), in_training)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("params, match", [
    ({"init_word": ""}, "init_word is empty"),
    ({"init_word": "  "}, "init_word is empty"),
    ({"init_word": "qzxvbnm"}, "not a word the tokenizer knows"),
    ({"token": ""}, "token must be a trigger word"),
    ({"token": "a/b"}, "token must be a trigger word"),
    ({"token": "!?"}, None),  # punctuation is a token: accepted
    ({"n_vectors": 0}, "n_vectors must be an integer"),
    ({"n_vectors": 76}, "n_vectors must be an integer"),
])
def test_bad_words_are_refused(tiny_files, params, match):
    kwargs = {"base_config": str(tiny_files.config), "base_ckpt": str(tiny_files.safetensors), "token": TOKEN,
              "init_word": INIT_WORD, **params}
    if match is None:
        TextualInversion(**kwargs)
        return
    with pytest.raises(UserError, match=match):
        TextualInversion(**kwargs)


def test_main_refuses_an_unknown_init_word(tmp_path, tiny, tiny_files, capsys):
    config = tiny.write_config(ti_config(tiny_files, init_word="qzxvbnm"), tmp_path / "bad.yaml")
    assert train(["--base", str(config), "--max_steps", "1", "--logdir", str(tmp_path / "logs")]) == 2
    assert "init_word 'qzxvbnm' is not a word the tokenizer knows" in capsys.readouterr().err


# ------------------------------------------------------------------ gradients reach the vectors alone
TINY_HF_TEXT = {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                "projection_dim": WIDTH}
TINY_OPENCLIP = {"embed_dim": WIDTH, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH,
                                                  "heads": 4, "layers": 1}}
ENCODERS = {
    "clip": lambda: FrozenCLIPEmbedder(text_config=TINY_HF_TEXT),
    "openclip": lambda: FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="last"),
    "trainable": lambda: CLIPTokenTransformerEmbedder(n_embed=WIDTH, n_layer=1, n_head=4),
}


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_gradients_reach_the_vectors_through_every_prompt_encoder(kind):
    torch.manual_seed(0)
    encoder = freeze_module(ENCODERS[kind]())
    vectors = torch.nn.Parameter(torch.randn(N_VECTORS, WIDTH))
    use_embeddings(encoder, EmbeddingSet({TOKEN: Embedding(TOKEN, vectors)}))
    encoder([f"a {TOKEN} square", "a red square"]).square().sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
