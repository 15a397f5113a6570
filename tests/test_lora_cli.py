"""``<lora:...>`` prompt tags (A1111's syntax) and the scripts' ``--lora`` / ``--lora-dir`` flags, run on the
tiny model with a kohya-layout LoRA file written here."""
import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm.cli
from ldm.errors import UserError
from ldm.image_io import read_parameters
from ldm.modules.extra_networks import LoraTag, parse_prompt

# ------------------------------------------------------------------------------------------- tag parsing

@pytest.mark.parametrize("prompt, tags", [
    ("a cat <lora:style>", [LoraTag("style", 1.0, 1.0)]),
    ("a cat <lora:style:0.8>", [LoraTag("style", 0.8, 0.8)]),
    ("a cat <lora:style:0.5:1.5>", [LoraTag("style", 0.5, 1.5)]),
    ("<lora:style:unet=0.25> a cat", [LoraTag("style", 1.0, 0.25)]),
    ("<lora:style:0.7:te=0.1> a cat", [LoraTag("style", 0.1, 0.1)]),
    ("<lyco:a:2>, <lora:b:-1>", [LoraTag("a", 2.0, 2.0), LoraTag("b", -1.0, -1.0)]),
])
def test_lora_tags_are_read_as_a1111_reads_them(prompt, tags):
    assert parse_prompt(prompt).loras == tags


def test_tags_are_cut_out_of_the_prompt_and_nothing_else_changes():
    parsed = parse_prompt("a (red:1.2) cat, <lora:style:0.8> on [a|b] <hypernet:h:1>mat<addnet:x:1>")
    assert parsed.text == "a (red:1.2) cat,  on [a|b] mat"
    assert parsed.skipped == ["<addnet:x:1>"] and len(parsed.hypernets) == 1
    assert parse_prompt("a <b> c <:x>").text == "a <b> c <:x>"   # not tags: no kind, or no argument


def test_a_tag_with_words_for_multipliers_is_refused_by_name():
    with pytest.raises(UserError, match="<lora:style:strong>"):
        parse_prompt("<lora:style:strong>")


# ----------------------------------------------------------------------------------------- the scripts

def kohya_lora_for(model, path, seed=0, rank=2):
    """A kohya LoRA (fp16 lora_down/lora_up, 0-d alpha) on every attention q/k/v/out of the U-Net and on
    the text encoder's layers, named as kohya names them (``lora_unet_<diffusers path>``, ``lora_te_...``)."""
    from ldm.modules.lora import ModuleNames
    names = ModuleNames.for_model(model)
    picked = {f"lora_unet_{p.replace('.', '_')}": t for p, t in names.unet.items() if ".attn" in p}
    picked.update({f"lora_te_{p.replace('.', '_')}": t for p, t in names.text_encoder.items()})
    assert any(k.startswith("lora_te_") for k in picked) and any(k.startswith("lora_unet_") for k in picked)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, target in picked.items():
        out, inp = names.shape(target)[:2]
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) * 0.5).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.5).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    kohya_lora_for(tiny_model, folder / "style.safetensors")
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


def test_lora_weight_1_changes_the_image_and_weight_0_does_not(scripts, tiny_files, lora_dir, tmp_path):
    lora = str(lora_dir / "style.safetensors")
    base, base_info = render(scripts, tiny_files, tmp_path / "base")
    with_lora, _ = render(scripts, tiny_files, tmp_path / "w1", "--lora", f"{lora}:1")
    at_zero, _ = render(scripts, tiny_files, tmp_path / "w0", "--lora", f"{lora}:0")
    assert np.abs(with_lora - base).max() > 8
    assert np.array_equal(at_zero, base)
    assert "lora_hashes" not in base_info


def test_a_prompt_tag_equals_the_flag_and_is_cut_from_the_prompt(scripts, tiny_files, lora_dir, tmp_path):
    by_flag, flag_info = render(scripts, tiny_files, tmp_path / "flag", "--lora",
                                f"{lora_dir / 'style.safetensors'}:1")
    by_tag, tag_info = render(scripts, tiny_files, tmp_path / "tag", "--lora-dir", str(lora_dir),
                              prompt="a red circle<lora:style:1>")
    assert np.array_equal(by_tag, by_flag)
    assert tag_info["prompt"] == "a red circle"
    payload = (lora_dir / "style.safetensors").read_bytes()
    addnet = hashlib.sha256(payload[8 + int.from_bytes(payload[:8], "little"):]).hexdigest()[:12]
    assert tag_info["lora_hashes"] == f'"style: {addnet}"' == flag_info["lora_hashes"]


def test_the_model_weights_are_restored_after_the_run(scripts, tiny_files, lora_dir, tmp_path, loaded):
    render(scripts, tiny_files, tmp_path / "o", "--lora", f"{lora_dir / 'style.safetensors'}:1.5")
    after = loaded[0].state_dict()
    changed = [k for k, v in tiny_files.state_dict.items() if not torch.equal(after[k], v)]
    assert changed == []


def test_negative_prompt_tags_are_removed_with_a_warning(scripts, tiny_files, lora_dir, tmp_path, caplog):
    plain, _ = render(scripts, tiny_files, tmp_path / "a", "--negative-prompt", "blue")
    with caplog.at_level(logging.WARNING, logger="ldm"):
        tagged, info = render(scripts, tiny_files, tmp_path / "b", "--negative-prompt", "blue<lora:style:1>")
    assert np.array_equal(tagged, plain) and info["negative_prompt"] == "blue"
    assert "<lora:style:1>" in caplog.text


@pytest.mark.parametrize("flags, prompt, message", [
    (["--lora", "missing.safetensors:1"], "a", "--lora 'missing.safetensors' does not exist"),
    ([], "a <lora:style:1>", "<lora:style> ; pass --lora-dir".replace(" ;", ";")),
    (["--lora-dir", "LORAS"], "a <lora:nothere:1>", "no LoRA named 'nothere'"),
    (["--lora-dir", "nowhere"], "a", "--lora-dir 'nowhere' is not a folder"),
])
def test_bad_lora_flags_give_one_error_line(scripts, tiny_files, lora_dir, tmp_path, capsys, flags, prompt, message):
    flags = [str(lora_dir) if f == "LORAS" else f for f in flags]
    code = scripts.load("txt2img").main([*scripts.model_flags(tiny_files), "--prompt", prompt, "--steps", "2",
                                         "--n_samples", "1", "--outdir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_batches_whose_first_prompts_name_other_loras_are_refused(scripts, tiny_files, lora_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle <lora:style:1>\na blue square\n")
    base = [*scripts.model_flags(tiny_files), "--from-file", str(prompts), "--steps", "2", "--lora-dir",
            str(lora_dir), "--skip_grid", "--no-watermark"]
    txt2img = scripts.load("txt2img")
    # one batch of both prompts: the first prompt's tag serves the batch, as in A1111
    assert txt2img.main([*base, "--n_samples", "2", "--outdir", str(tmp_path / "one")]) == 0
    assert read_parameters(tmp_path / "one" / "samples" / "00001.png")["prompt"] == "a blue square"
    capsys.readouterr()
    assert txt2img.main([*base, "--n_samples", "1", "--outdir", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "different batches" in err[0]


# ------------------------------------------------------------------------------------ the hash in the PNG

def test_lora_hash_is_a1111s_short_hash(tmp_path):
    from ldm.modules.lora.hashes import lora_short_hash
    tensors = {"x.lora_down.weight": torch.ones(2, 3)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"ss_output_name": "renamed"})
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    torch.save(tensors, tmp_path / "d.pt")
    # the header (metadata) is not hashed: the same tensors give the same hash
    assert lora_short_hash(tmp_path / "a.safetensors") == lora_short_hash(tmp_path / "b.safetensors")
    assert len(lora_short_hash(tmp_path / "a.safetensors")) == 12
    assert lora_short_hash(tmp_path / "c.safetensors") == "0123456789ab"
    assert lora_short_hash(tmp_path / "d.pt") == hashlib.sha256((tmp_path / "d.pt").read_bytes()).hexdigest()[:12]


def test_a_quoted_lora_hashes_value_reads_back_whole():
    from ldm.image_io import format_parameters, parse_parameters
    text = format_parameters({"prompt": "p", "seed": 1, "lora_hashes": '"a: 0123456789ab, b: ba9876543210"'})
    assert text.endswith('Seed: 1, Lora hashes: "a: 0123456789ab, b: ba9876543210"')
    assert parse_parameters(text)["lora_hashes"] == '"a: 0123456789ab, b: ba9876543210"'
