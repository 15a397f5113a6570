"""Textual-inversion embeddings: each layout written here as its tool writes it, read back; trigger words in
prompts checked against an independent computation (the same vectors written into the token-embedding table
by hand, run through the encoder's network without any prompt machinery)."""
import base64
import copy
import json
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.modules.encoders.embeddings import (EmbeddingSet, PromptEmbeddings, embedding_from_data, lcg_key,
                                             load_embeddings, read_embedding_file, use_embeddings)
from ldm.modules.encoders.modules import CLIPTokenTransformerEmbedder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.prompt_chunks import chunk_prompt
from ldm.modules.encoders.tokenizer import BOS_TOKEN_ID as BOS, EOS_TOKEN_ID as EOS, CLIPBPETokenizer, load_bpe
from tiny_models import with_random_layer_norms

WIDTH = 32
TINY_HF_TEXT = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=WIDTH)
TINY_OPENCLIP = {"embed_dim": WIDTH, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH,
                                                  "heads": 4, "layers": 2}}
VOCAB = load_bpe()[0]
A, PHOTO, OF, CAT, DOG = (VOCAB[w + "</w>"] for w in ("a", "photo", "of", "cat", "dog"))
ROWS = tuple(VOCAB[w + "</w>"] for w in ("bird", "fish", "tree"))  # where tests write vectors by hand
SD1 = CLIPBPETokenizer(77, pad_token_id=EOS)
A1111 = dict(emphasis="original", truncate=False)


def vectors(n, width=WIDTH, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# --- the tools' writers -------------------------------------------------------------------------------------------

def save_a1111_pt(path, vec, name="whatever", dtype=torch.float32):
    """A1111's Embedding.save: the trained tensor (requires_grad) in plain dicts, and its metadata."""
    trained = vec.to(dtype).clone().requires_grad_(True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": trained}, "name": name, "step": 1500,
                "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)


def save_original_ti_pt(path, vec):
    """The original textual-inversion code (EmbeddingManager.save): a pickled nn.ParameterDict, tensor token ids."""
    params = torch.nn.ParameterDict()
    params["*"] = torch.nn.Parameter(vec.clone())
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)


def save_kohya(path, vec, dtype=torch.float16):
    """kohya sd-scripts' save_weights: {"emb_params": [n, D]} in the save precision, with ss_* metadata."""
    state = {"emb_params": vec.detach().clone().to("cpu").to(dtype)}
    if str(path).endswith(".safetensors"):
        save_file(state, path, {"ss_output_name": "mine", "ss_num_vectors_per_token": str(len(vec))})
    else:
        torch.save(state, path)


def save_diffusers(path, token, vec):
    """diffusers' textual_inversion.py save_progress: {placeholder token: [D] or [n, D]}."""
    state = {token: vec.detach().cpu()}
    if str(path).endswith(".safetensors"):
        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)


def a1111_json(data):
    """A1111's EmbeddingEncoder: every tensor becomes {"TORCHTENSOR": its values as nested lists}."""
    def default(obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        raise TypeError(type(obj).__name__)
    return json.dumps(data, default=default)


def picture(width=24, height=16, seed=0):
    # values from 1: A1111's decoder crops away borders of pixels that have a channel at 0
    return Image.fromarray(np.random.RandomState(seed).randint(1, 256, (height, width, 3), dtype=np.uint8))


def a1111_pixel_image(image, data):
    """A1111's insert_image_data_embed: the zlib'd JSON as low/high nibble strips, keyed and patterned, placed left
    and right of the picture behind one black column each."""
    stream = np.frombuffer(zlib.compress(a1111_json(data).encode(), level=9), np.uint8)
    h = image.size[1]
    size = len(stream) + (h - len(stream) % h)
    size += h * 3 - size % (h * 3)
    shades = np.array(next(iter(data["string_to_param"].values())).detach().numpy().tolist()[0][:1024])
    shades = (np.abs(shades) / np.max(np.abs(shades)) * 255).astype(np.uint8)

    def strip(nibbles, sequence):
        block = np.resize(nibbles, size).reshape(h, -1, 3)
        pattern = Image.new("RGB", (block.shape[1], h))
        draw, i = ImageDraw.Draw(pattern), 0
        for x in range(-6, block.shape[1], 8):
            for row, y in enumerate(range(-6, h, 8)):
                offset = 4 if row % 2 == 0 else 0
                shade = int(sequence[i % len(sequence)])
                i += 1
                draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
        block = block ^ (np.array(pattern).astype(np.uint8) & 0xF0)
        key = lcg_key(block.size).reshape(block.shape)
        return Image.fromarray(np.bitwise_xor(block.astype(np.uint8), key & 0x0F), mode="RGB")

    low, high = strip(stream & 0x0F, shades), strip(stream >> 4, shades[::-1])
    out = Image.new("RGB", (image.size[0] + low.size[0] + high.size[0] + 2, h), (0, 0, 0))
    out.paste(low, (0, 0))
    out.paste(image, (low.size[0] + 1, 0))
    out.paste(high, (low.size[0] + 1 + image.size[0] + 1, 0))
    return out


def save_a1111_png(path, vec, name, text_chunk=True, pixels=True):
    """A1111's training preview: the .pt dict (as torch.load gives it back) in a sd-ti-embedding text chunk and/or
    in the pixels."""
    pt = path.with_suffix(".tmp.pt")
    save_a1111_pt(pt, vec, name)
    data = torch.load(pt, weights_only=True)
    pt.unlink()
    image = a1111_pixel_image(picture(), data) if pixels else picture()
    info = PngImagePlugin.PngInfo()
    if text_chunk:
        info.add_text("sd-ti-embedding", base64.b64encode(a1111_json(data).encode()))
    image.save(path, "PNG", pnginfo=info)


class RunsCode:
    """Unpickling this calls os.system: what a malicious .pt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- reading each layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a1111_pt_reads_its_vectors_under_the_file_name(tmp_path, dtype):
    vec = vectors(3)
    save_a1111_pt(tmp_path / "mine.pt", vec, name="not-the-trigger", dtype=dtype)
    embedding = read_embedding_file(tmp_path / "mine.pt")
    assert embedding.name == "mine"  # A1111 names .pt embeddings by the file, not the name inside
    assert embedding.vectors.dtype == torch.float32 and not embedding.vectors.requires_grad
    assert torch.equal(embedding.vectors, vec.to(dtype).float())
    assert (embedding.step, embedding.sd_checkpoint_name) == (1500, "v1-5-pruned-emaonly")


def test_original_textual_inversion_parameter_dict_loads_without_running_code(tmp_path):
    vec = vectors(2)
    save_original_ti_pt(tmp_path / "old.pt", vec)
    embedding = read_embedding_file(tmp_path / "old.pt")
    assert embedding.name == "old" and torch.equal(embedding.vectors, vec)


def test_one_dimensional_string_to_param_is_one_vector():
    vec = vectors(1)[0]
    embedding = embedding_from_data({"string_to_param": {"*": vec}}, "w")
    assert embedding.vectors.shape == (1, WIDTH) and torch.equal(embedding.vectors[0], vec)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_kohya_emb_params(tmp_path, suffix):
    vec = vectors(4)
    save_kohya(tmp_path / f"style{suffix}", vec)
    embedding = read_embedding_file(tmp_path / f"style{suffix}")
    assert embedding.name == "style" and torch.equal(embedding.vectors, vec.half().float())


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@pytest.mark.parametrize("shape", [(WIDTH,), (2, WIDTH)])
def test_diffusers_learned_embeds(tmp_path, suffix, shape):
    vec = torch.randn(shape)
    save_diffusers(tmp_path / f"learned_embeds{suffix}", "<cat-toy>", vec)
    embedding = read_embedding_file(tmp_path / f"learned_embeds{suffix}", name="cat-toy")
    assert embedding.name == "cat-toy" and torch.equal(embedding.vectors, vec.reshape(-1, WIDTH))
    assert read_embedding_file(tmp_path / f"learned_embeds{suffix}").name == "learned_embeds"


def test_a1111_png_text_chunk_and_its_inner_name(tmp_path):
    vec = vectors(2)
    save_a1111_png(tmp_path / "renamed.png", vec, name="cyan-500", pixels=False)
    embedding = read_embedding_file(tmp_path / "renamed.png")
    assert embedding.name == "cyan-500"  # A1111 reads a PNG embedding by the name it holds
    assert torch.equal(embedding.vectors, vec) and embedding.step == 1500


def test_a1111_png_pixel_encoding_without_text_chunk(tmp_path):
    vec = vectors(3)
    save_a1111_png(tmp_path / "old-style.png", vec, name="pixels", text_chunk=False)
    assert "sd-ti-embedding" not in Image.open(tmp_path / "old-style.png").text
    embedding = read_embedding_file(tmp_path / "old-style.png")
    assert embedding.name == "pixels" and torch.equal(embedding.vectors, vec)


def test_lcg_key_is_a1111s():
    # the first values A1111's own test of image_embedding.lcg expects
    assert lcg_key(10).tolist() == [253, 242, 127, 44, 157, 27, 239, 133, 38, 79]


def test_png_without_embedding_is_user_error(tmp_path):
    picture().save(tmp_path / "photo.png")
    with pytest.raises(UserError, match="holds no embedding"):
        read_embedding_file(tmp_path / "photo.png")


# --- refusals ------------------------------------------------------------------------------------------------------

def test_malicious_pt_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": vectors(1)}, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"needs code execution to load \(posix\.system\)") as err:
        read_embedding_file(tmp_path / "evil.pt")
    assert len(str(err.value).splitlines()) == 1
    assert not marker.exists()


def test_code_hidden_in_a_parameter_dict_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(1))})
    params.hook = RunsCode(marker)  # a plain attribute: pickled in the ParameterDict's state
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"code execution to load \(posix\.system\)"):
        read_embedding_file(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("data, match", [
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL embedding"),
    ({"string_to_param": {"*": torch.zeros(1, 8), "+": torch.zeros(1, 8)}}, "exactly one"),
    ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "holds 2 entries"),
    ({"emb_params": torch.zeros(2, 3, 8)}, r"shape \[2, 3, 8\]"),
    ({"emb_params": torch.full((1, 8), float("nan"))}, "NaN"),
    ({"emb_params": "text"}, "a str where its vectors"),
])
def test_unusable_layouts_are_refused_by_name(data, match):
    with pytest.raises(UserError, match=match):
        embedding_from_data(data, "x", source="x.safetensors")


def test_width_mismatch_names_the_embedding_and_both_widths():
    found = EmbeddingSet({"sd2style": read_like("sd2style", vectors(2, 1024))})
    table = PromptEmbeddings(found, SD1, width=768)
    assert table.report.mismatched == [("sd2style", [2, 1024], [2, 768])]
    table.runs(SD1.encode("a cat"))  # unused: no error
    with pytest.raises(UserError, match=r"'sd2style'.*1024-wide.*768 wide.*SD 1\.x embeddings are 768 wide"):
        table.runs(SD1.encode("a sd2style cat"))


def read_like(name, vec):
    return embedding_from_data({"emb_params": vec}, name, source=f"{name}.safetensors")


# --- a folder ------------------------------------------------------------------------------------------------------

def test_folder_loads_every_layout_and_refuses_the_bad_files_by_trigger_word(tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    marker = tmp_path / "ran"
    save_a1111_pt(folder / "a1111.pt", vectors(1, seed=1), name="ignored")
    save_original_ti_pt(folder / "sub" / "original.pt", vectors(2, seed=2))
    save_kohya(folder / "kohya.safetensors", vectors(3, seed=3))
    save_diffusers(folder / "diffusers.bin", "<tok>", vectors(1, seed=4)[0])
    save_a1111_png(folder / "trained-100.png", vectors(2, seed=5), name="pngword")
    (folder / "pngword.preview.png").write_bytes((folder / "trained-100.png").read_bytes())  # A1111 skips previews
    picture().save(folder / "photo.png")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.txt").write_text("not an embedding")
    torch.save({"emb_params": vectors(1), "x": RunsCode(marker)}, folder / "evil.pt")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, folder / "xl.safetensors")
    save_kohya(folder / "twice.pt", vectors(1))
    save_kohya(folder / "twice.safetensors", vectors(1))

    found = load_embeddings(folder)
    assert sorted(found.embeddings) == ["a1111", "diffusers", "kohya", "original", "pngword"]
    assert sorted(found.refused) == ["evil", "twice", "xl"]
    assert sorted(os.path.basename(p) for p in found.skipped) == ["empty.pt", "photo.png", "pngword.preview.png"]
    assert not marker.exists()

    table = PromptEmbeddings(found, SD1, WIDTH)
    assert table.report.loaded == 5 and table.report.unexpected == ["evil", "twice", "xl"]
    for prompt, match in (("an evil cat", "code execution"), ("xl", "SDXL"), ("twice", "several files")):
        with pytest.raises(UserError, match=match):
            table.runs(SD1.encode(prompt))


def test_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="embeddings directory .* does not exist"):
        load_embeddings(tmp_path / "nope")


# --- prompts -> chunks ---------------------------------------------------------------------------------------------

def placed(chunk):
    """(position, vectors as lists) of a chunk's embedding overrides."""
    return [(o.position, o.vectors.tolist()) for o in chunk.overrides]


def table_of(**embeddings):
    return PromptEmbeddings(EmbeddingSet({n: read_like(n, v) for n, v in embeddings.items()}), SD1, WIDTH)


def test_trigger_word_fills_one_position_per_vector_with_its_emphasis():
    vec = vectors(3)
    table = table_of(myword=vec)
    [chunk] = chunk_prompt("a photo of (myword:1.2), cat", SD1, embeddings=table)
    assert chunk.token_ids[:4] == [BOS, A, PHOTO, OF]
    assert chunk.token_ids[7:10] == [VOCAB[",</w>"], CAT, EOS]  # three positions for the three vectors
    assert chunk.weights[:9] == [1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.2, 1.0, 1.0]
    assert placed(chunk) == [(4, vec.tolist())]


def test_longest_trigger_word_wins_and_matching_is_on_tokens():
    short, long = vectors(1, seed=1), vectors(2, seed=2)
    table = table_of(**{"cat": short, "cat-dog": long})
    [chunk] = chunk_prompt("Cat-Dog cat cats", SD1, embeddings=table)  # the tokenizer lowercases
    assert placed(chunk) == [(1, long.tolist()), (3, short.tolist())]
    assert chunk.token_ids[4:6] == [*SD1.encode("cats"), EOS]  # another word: not the trigger


def test_embedding_is_not_split_across_the_chunk_boundary():
    vec = vectors(3)
    table = table_of(myword=vec)
    fits = chunk_prompt("cat " * 72 + "myword", SD1, embeddings=table)
    assert len(fits) == 1 and fits[0].overrides[0].position == 73
    first, second = chunk_prompt("cat " * 73 + "myword dog", SD1, embeddings=table)
    assert first.token_ids[:75] == [BOS] + [CAT] * 73 + [EOS] and first.overrides == []
    assert placed(second) == [(1, vec.tolist())]
    assert second.token_ids[4:6] == [DOG, EOS]


def test_emphasis_none_still_reads_trigger_words():
    table = table_of(myword=vectors(2))
    [chunk] = chunk_prompt("(myword:1.5)", SD1, emphasis="none", embeddings=table)
    assert [o.position for o in chunk.overrides] == [2]  # "(" first, then the two vectors
    assert set(chunk.weights) == {1.0}


# --- encoders: trigger words against the vectors written into the token table by hand ---------------------------

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
    return with_random_layer_norms(CLIPTokenTransformerEmbedder(n_embed=WIDTH, n_layer=2, n_head=4, **A1111)).eval()


def network_clip(encoder, tokens):
    return encoder.transformer(input_ids=tokens, position_ids=torch.arange(77)[None]).last_hidden_state


def network_openclip(encoder, tokens):
    return encoder.encode_with_transformer(tokens)


def network_trainable(encoder, tokens):
    x = encoder.token_embedding(tokens) + encoder.positional_embedding
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_final(x)


@pytest.fixture(params=["clip", "openclip", "trainable"])
def encoder_and_network(request):
    network = {"clip": network_clip, "openclip": network_openclip, "trainable": network_trainable}[request.param]
    return request.getfixturevalue(request.param), network


def by_hand(encoder, network, content, vec, rows=ROWS):
    """The network's output for ``content`` token ids in one chunk, where the placeholder ids ``rows`` have
    ``vec`` written into a copy of the token-embedding table."""
    encoder = copy.deepcopy(encoder)
    with torch.no_grad():
        for row, v in zip(rows, vec):
            encoder.token_embedding_layer().weight[row] = v
    pad = encoder.tokenizer.pad_token_id
    tokens = torch.tensor([[BOS, *content, EOS] + [pad] * (75 - len(content))])
    return network(encoder, tokens)


@pytest.fixture
def with_myword():
    """Attach a 3-vector embedding "myword" to an encoder for one test."""
    attached = []

    def attach(encoder, vec):
        attached.append(encoder)
        return use_embeddings(encoder, EmbeddingSet({"myword": read_like("myword", vec)}))
    yield attach
    for encoder in attached:
        use_embeddings(encoder, None)


@torch.no_grad()
def test_trigger_word_equals_its_vectors_in_the_token_table(encoder_and_network, with_myword):
    encoder, network = encoder_and_network
    vec = vectors(3)
    expected = by_hand(encoder, network, [A, PHOTO, OF, *ROWS, VOCAB[",</w>"], CAT], vec)
    plain = encoder("a photo of myword, cat")
    with_myword(encoder, vec)
    assert torch.equal(encoder("a photo of myword, cat"), expected)
    assert not torch.equal(plain, expected)  # the trigger word changed the conditioning


@torch.no_grad()
def test_emphasis_weights_the_embeddings_positions(encoder_and_network, with_myword):
    encoder, network = encoder_and_network
    vec = vectors(3)
    with_myword(encoder, vec)
    z = by_hand(encoder, network, [A, *ROWS], vec)
    weights = torch.tensor([1.0, 1.0, 1.5, 1.5, 1.5] + [1.0] * 72)[None, :, None]
    assert torch.allclose(encoder("a (myword:1.5)", emphasis="no-norm"), z * weights, atol=1e-6)
    weighted = z * weights
    expected = weighted * (z.mean() / weighted.mean())
    assert torch.allclose(encoder("a (myword:1.5)", emphasis="original"), expected, atol=1e-6)


@torch.no_grad()
def test_embedding_moves_whole_to_the_next_chunk(encoder_and_network, with_myword):
    encoder, network = encoder_and_network
    vec = vectors(3)
    with_myword(encoder, vec)
    z = encoder("cat " * 73 + "myword")
    assert z.shape == (1, 154, WIDTH)
    assert torch.equal(z[:, :77], by_hand(encoder, network, [CAT] * 73, vec, rows=()))
    assert torch.equal(z[:, 77:], by_hand(encoder, network, list(ROWS), vec))


@torch.no_grad()
def test_encoder_of_another_width_refuses_the_embedding_when_used(clip, with_myword):
    with_myword(clip, vectors(3, width=WIDTH + 16))
    clip("a cat")
    with pytest.raises(UserError, match=rf"'myword'.*{WIDTH + 16}-wide.*{WIDTH} wide"):
        clip("a myword")


def test_embeddings_need_a_text_encoder():
    with pytest.raises(UserError, match="need a prompt text encoder"):
        use_embeddings(torch.nn.Linear(1, 1), EmbeddingSet())


# --- generation and the CLI ---------------------------------------------------------------------------------------

def test_txt2img_uses_the_embeddings_of_the_model(tiny, tmp_path):
    from ldm.generate import txt2img
    model = tiny.build()
    vec = vectors(3)
    save_kohya(tmp_path / "myword.safetensors", vec, dtype=torch.float32)
    by_hand_model = copy.deepcopy(model)
    with torch.no_grad():
        for row, v in zip(ROWS, vec):
            by_hand_model.cond_stage_model.token_embedding.weight[row] = v
    settings = dict(steps=2, seed=3, n_samples=1, progress=False)
    table = use_embeddings(model, tmp_path)
    assert table.report.loaded == 1
    image = np.asarray(txt2img(model, "a (myword:1.2) circle", **settings)[0])
    assert np.array_equal(image, np.asarray(txt2img(by_hand_model, "a (bird fish tree:1.2) circle", **settings)[0]))
    use_embeddings(model, None)
    assert not np.array_equal(image, np.asarray(txt2img(model, "a (myword:1.2) circle", **settings)[0]))


def test_cli_embeddings_flag(scripts, tiny_files, tmp_path, capsys):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_kohya(folder / "myword.safetensors", vectors(2), dtype=torch.float32)
    common = [*scripts.model_flags(tiny_files), "--steps", "1", "--n_samples", "1", "--skip_grid", "--no-watermark"]
    txt2img = scripts.load("txt2img")
    images = []
    for name, flags in (("with", ["--embeddings", str(folder)]), ("without", [])):
        assert txt2img.main([*common, "--prompt", "a myword", *flags, "--outdir", str(tmp_path / name)]) == 0
        [sample] = (tmp_path / name / "samples").glob("*.png")
        images.append(np.asarray(Image.open(sample)))
    assert not np.array_equal(*images)  # the flag reached the text encoder
    capsys.readouterr()
    assert txt2img.main([*common, "--embeddings", str(tmp_path / "nope"), "--outdir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --embeddings") and "nope" in err[0]
