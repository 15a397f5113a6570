"""``<hypernet:...>`` prompt tags (A1111's syntax) and the scripts' ``--hypernetwork`` / ``--hypernetwork-dir`` flags,
run on the tiny model with A1111-layout hypernetwork files written here."""
import hashlib
import logging

import numpy as np
import pytest
import torch
from a1111_hypernetworks import save_a1111_hypernetwork
from PIL import Image

import ldm.cli
from ldm.errors import UserError
from ldm.image_io import format_parameters, parse_parameters, read_parameters
from ldm.modules.extra_networks import HypernetTag, parse_prompt
from ldm.modules.hypernetworks import attention_layers

# ------------------------------------------------------------------------------------------- tag parsing


@pytest.mark.parametrize("prompt, tags", [
    ("a cat <hypernet:ink>", [HypernetTag("ink", 1.0)]),
    ("a cat <hypernet:ink:0.6>", [HypernetTag("ink", 0.6)]),
    ("<hypernet:ink:-1:whatever> a cat", [HypernetTag("ink", -1.0)]),   # A1111 reads two items, ignores the rest
    ("<hypernet:a:2>, <lora:b:1> <hypernet:b>", [HypernetTag("a", 2.0), HypernetTag("b", 1.0)]),
])
def test_hypernet_tags_are_read_as_a1111_reads_them(prompt, tags):
    parsed = parse_prompt(prompt)
    assert parsed.hypernets == tags and "<hypernet" not in parsed.text


@pytest.mark.parametrize("prompt, message", [
    ("<hypernet:ink:strong>", "the multiplier must be a number"),
    ("<hypernet::1>", "names no hypernetwork"),
])
def test_a_bad_hypernet_tag_is_refused_by_name(prompt, message):
    with pytest.raises(UserError, match=message):
        parse_prompt(prompt)


# ----------------------------------------------------------------------------------------- the scripts

@pytest.fixture(scope="module")
def hypernet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hypernetworks")
    (folder / "styles").mkdir()
    save_a1111_hypernetwork(folder / "styles" / "ink.pt", "relu_norm", seed=1, std=0.5)
    save_a1111_hypernetwork(folder / "paint.pt", "novelai", seed=2, std=0.5)
    save_a1111_hypernetwork(folder / "sd1.pt", widths=(320, 640, 768, 1280))
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, folder / "embedding.pt")
    return folder


@pytest.fixture
def loaded(monkeypatch):
    """Records the model each script run loads."""
    models = []
    original = ldm.cli.load_model_for

    def load(args):
        models.append(original(args))
        return models[-1]
    monkeypatch.setattr(ldm.cli, "load_model_for", load)
    return models


def render(scripts, tiny_files, outdir, *flags, prompt="a red circle"):
    code = scripts.load("txt2img").main([*scripts.model_flags(tiny_files), "--prompt", prompt, "--steps", "3",
                                         "--n_samples", "1", "--skip_grid", "--no-watermark", "--outdir",
                                         str(outdir), *flags])
    assert code == 0
    path = outdir / "samples" / "00000.png"
    return np.asarray(Image.open(path)).astype(np.int16), read_parameters(path)


def sha10(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_multiplier_1_changes_the_image_and_0_does_not(scripts, tiny_files, hypernet_dir, tmp_path):
    ink = hypernet_dir / "styles" / "ink.pt"
    base, base_info = render(scripts, tiny_files, tmp_path / "base")
    with_hypernet, info = render(scripts, tiny_files, tmp_path / "m1", "--hypernetwork", str(ink))
    at_zero, _ = render(scripts, tiny_files, tmp_path / "m0", "--hypernetwork", f"{ink}:0")
    assert np.abs(with_hypernet - base).max() > 8
    assert np.array_equal(at_zero, base)
    assert "hypernet" not in base_info
    assert (info["hypernet"], info["hypernet_hash"]) == ("ink", sha10(ink)) and "hypernet_strength" not in info


def test_a_prompt_tag_equals_the_flag_and_is_cut_from_the_prompt(scripts, tiny_files, hypernet_dir, tmp_path):
    by_flag, flag_info = render(scripts, tiny_files, tmp_path / "flag", "--hypernetwork",
                                f"{hypernet_dir / 'styles' / 'ink.pt'}:0.8")
    by_tag, tag_info = render(scripts, tiny_files, tmp_path / "tag", "--hypernetwork-dir", str(hypernet_dir),
                              prompt="a red circle<hypernet:ink:0.8>")
    assert np.array_equal(by_tag, by_flag)
    assert tag_info["prompt"] == "a red circle"
    assert tag_info["hypernet_strength"] == "0.8" == flag_info["hypernet_strength"]
    assert tag_info["hypernet"] == "ink" == flag_info["hypernet"]


def test_two_chain_and_are_recorded_in_order(scripts, tiny_files, hypernet_dir, tmp_path):
    ink, paint = hypernet_dir / "styles" / "ink.pt", hypernet_dir / "paint.pt"
    one, _ = render(scripts, tiny_files, tmp_path / "one", "--hypernetwork", str(ink))
    both, info = render(scripts, tiny_files, tmp_path / "two", "--hypernetwork", str(ink),
                        "--hypernetwork-dir", str(hypernet_dir), prompt="a red circle <hypernet:paint:0.5>")
    assert not np.array_equal(both, one)
    assert info["hypernet"] == '"ink, paint"'
    assert info["hypernet_hash"] == f'"{sha10(ink)}, {sha10(paint)}"'
    assert info["hypernet_strength"] == '"1.0, 0.5"'


def test_the_model_runs_unhooked_after_the_run(scripts, tiny_files, hypernet_dir, tmp_path, loaded):
    render(scripts, tiny_files, tmp_path / "o", "--hypernetwork", str(hypernet_dir / "paint.pt"))
    assert all(layer.context_hook is None for layer, _ in attention_layers(loaded[0]))


def test_negative_prompt_tags_are_removed_with_a_warning(scripts, tiny_files, hypernet_dir, tmp_path, caplog):
    plain, _ = render(scripts, tiny_files, tmp_path / "a", "--negative-prompt", "blue")
    with caplog.at_level(logging.WARNING, logger="ldm"):
        tagged, info = render(scripts, tiny_files, tmp_path / "b", "--negative-prompt", "blue<hypernet:ink:1>")
    assert np.array_equal(tagged, plain) and info["negative_prompt"] == "blue" and "hypernet" not in info
    assert "<hypernet:ink:1>" in caplog.text


@pytest.mark.parametrize("flags, prompt, message", [
    (["--hypernetwork", "missing.pt:1"], "a", "--hypernetwork 'missing.pt' does not exist"),
    ([], "a <hypernet:ink:1>", "<hypernet:ink>; pass --hypernetwork-dir"),
    (["--hypernetwork-dir", "DIR"], "a <hypernet:nothere>", "no hypernetwork named 'nothere'"),
    (["--hypernetwork-dir", "nowhere"], "a", "--hypernetwork-dir 'nowhere' is not a folder"),
    (["--hypernetwork-dir", "DIR"], "a <hypernet:sd1>", "read widths 32, 64; it was made for another model"),
    (["--hypernetwork-dir", "DIR"], "a <hypernet:embedding>", "is not a hypernetwork: it holds a textual-inversion"),
])
def test_bad_hypernetwork_flags_give_one_error_line(scripts, tiny_files, hypernet_dir, tmp_path, capsys, loaded,
                                                    flags, prompt, message):
    flags = [str(hypernet_dir) if f == "DIR" else f for f in flags]
    code = scripts.load("txt2img").main([*scripts.model_flags(tiny_files), "--prompt", prompt, "--steps", "2",
                                         "--n_samples", "1", "--outdir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert all(layer.context_hook is None for model in loaded for layer, _ in attention_layers(model))


def test_an_error_after_a_lora_was_merged_leaves_the_weights_as_they_were(scripts, tiny_files, hypernet_dir,
                                                                        tmp_path, capsys, loaded):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{q}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{q}.lora_up.weight": torch.randn(32, 2, generator=g)}, str(tmp_path / "q.safetensors"))
    code = scripts.load("txt2img").main([*scripts.model_flags(tiny_files), "--steps", "2", "--n_samples", "1",
                                         "--outdir", str(tmp_path / "o"), "--lora", str(tmp_path / "q.safetensors"),
                                         "--hypernetwork", str(hypernet_dir / "sd1.pt")])
    assert code == 2 and "made for another model" in capsys.readouterr().err
    after = loaded[0].state_dict()
    assert [k for k, v in tiny_files.state_dict.items() if not torch.equal(after[k], v)] == []


def test_batches_whose_first_prompts_name_other_hypernetworks_are_refused(scripts, tiny_files, hypernet_dir,
                                                                          tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle <hypernet:ink>\na blue square\n")
    txt2img = scripts.load("txt2img")
    assert txt2img.main([*scripts.model_flags(tiny_files), "--from-file", str(prompts), "--steps", "2",
                         "--hypernetwork-dir", str(hypernet_dir), "--n_samples", "1", "--outdir",
                         str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "different batches" in err[0]


def test_the_hypernet_fields_read_back_as_a1111_writes_them():
    text = format_parameters({"prompt": "p", "seed": 1, "model_hash": "0123456789", "hypernet": "ink",
                              "hypernet_hash": "abcdef0123", "hypernet_strength": "0.8"})
    assert text.endswith("Seed: 1, Model hash: 0123456789, Hypernet: ink, Hypernet hash: abcdef0123, "
                         "Hypernet strength: 0.8")
    assert parse_parameters(text)["hypernet_strength"] == "0.8"
