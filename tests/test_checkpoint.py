import hashlib
import logging
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm import checkpoint
from ldm.checkpoint import (file_hash, load_model, load_state_dict_into, read_shapes,
                            read_state_dict, suggest_config)
from ldm.errors import UserError

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ reading files

def test_read_wrapped_unwrapped_and_safetensors(tiny_files, tmp_path):
    torch.save(tiny_files.state_dict, tmp_path / "flat.pth")
    for path in (tiny_files.ckpt, tiny_files.safetensors, tmp_path / "flat.pth"):
        assert same(read_state_dict(path), tiny_files.state_dict)
    shapes = read_shapes(tiny_files.safetensors)
    assert shapes[UNET_IN] == (32, 4, 3, 3) and len(shapes) == len(tiny_files.state_dict)


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_corrupt_and_truncated_files_are_user_errors(tiny_files, tmp_path, name):
    source = tiny_files.ckpt if name.endswith(".ckpt") else tiny_files.safetensors
    data = source.read_bytes()
    noise = np.random.RandomState(0).bytes
    for content in (data[: len(data) // 2], noise(100), noise(4096)):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError, match="corrupt") as err:
            read_state_dict(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_state_dict(tmp_path / "nope.ckpt")
    with pytest.raises(UserError, match="is a directory"):
        read_state_dict(tmp_path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_runs_code_is_refused(tmp_path, zip_format):
    marker = str(tmp_path / "code-ran")
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": RunsCode(marker)},
               tmp_path / "evil.ckpt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError, match="needs code execution") as err:
        read_state_dict(tmp_path / "evil.ckpt")
    assert "mkdir" in str(err.value)
    assert not os.path.exists(marker)


def test_lightning_bookkeeping_is_skipped(tmp_path):
    pl_callbacks = pytest.importorskip("pytorch_lightning.callbacks")
    sd = {"w": torch.arange(3.0)}
    torch.save({"state_dict": sd, "global_step": 7,
                "callbacks": {pl_callbacks.ModelCheckpoint: {"best_model_score": np.float64(0.5)}}},
               tmp_path / "old-lightning.ckpt")
    assert same(read_state_dict(tmp_path / "old-lightning.ckpt"), sd)


def test_non_state_dict_content(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(UserError, match="no tensors"):
        read_state_dict(tmp_path / "empty.pt")


def test_file_hash(tiny_files):
    expected = hashlib.sha256(tiny_files.safetensors.read_bytes()).hexdigest()[:10]
    assert file_hash(tiny_files.safetensors) == expected


# ------------------------------------------------------------------------------ loading weights

def test_load_counts_and_ignores_ema_and_position_ids(tiny, tiny_files, caplog):
    model = tiny.build(seed=1)
    sd = dict(tiny_files.state_dict)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelout2weight"] = torch.zeros(4, 32, 3, 3)
    sd[checkpoint.POSITION_IDS_KEY] = torch.arange(77)[None]
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        report = load_state_dict_into(model, sd)
    assert report.ok and report.loaded == len(tiny_files.state_dict)
    assert sorted(report.ignored) == sorted([checkpoint.POSITION_IDS_KEY, "model_ema.decay",
                                             "model_ema.diffusion_modelout2weight"])
    assert "ignored 3" in caplog.text
    assert same(model.state_dict(), tiny_files.state_dict)


def test_ema_weights_load_when_the_config_uses_ema(tiny):
    config = tiny.config(use_ema=True)
    source = tiny.build(config, seed=3)
    with torch.no_grad():
        source.model_ema.diffusion_modelout2weight.fill_(0.25)
    target = tiny.build(config, seed=4)
    report = load_state_dict_into(target, source.state_dict())
    assert report.ok and not report.ignored
    assert torch.all(target.model_ema.diffusion_modelout2weight == 0.25)


def test_ema_config_with_pruned_checkpoint(tiny, tiny_files):
    with pytest.raises(UserError, match="sets use_ema but this checkpoint has no EMA weights"):
        load_state_dict_into(tiny.build(tiny.config(use_ema=True)), tiny_files.state_dict)


def test_half_precision_checkpoint_loads_as_float32(tiny_files, tmp_path):
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_files.state_dict.items()}
    save_file(half, tmp_path / "half.safetensors")
    model = load_model(tiny_files.config, tmp_path / "half.safetensors", device="cpu")
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, half[UNET_IN].float())
    # forced, so that this CPU's native half types do not matter (see tests/test_precision.py)
    bf16 = load_model(tiny_files.config, tmp_path / "half.safetensors", device="cpu",
                      dtype="bf16", force_dtype=True)
    assert bf16.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.bfloat16
    fp16 = load_model(tiny_files.config, tmp_path / "half.safetensors", device="cpu",
                      dtype=torch.float16, force_dtype=True)
    assert fp16.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float16


def with_context_dim(sd, dim):
    """The tiny checkpoint with every cross-attention key/value projection widened to ``dim``."""
    sd = dict(sd)
    for key in sd:
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            sd[key] = torch.zeros(sd[key].shape[0], dim)
    return sd


def with_in_channels(sd, channels):
    sd = dict(sd)
    sd[UNET_IN] = torch.zeros(32, channels, 3, 3)
    return sd


@pytest.mark.parametrize("change, expected", [
    (lambda sd: with_context_dim(sd, 768), "use the config configs/stable-diffusion/v1-inference.yaml"),
    (lambda sd: with_context_dim(sd, 1024), "v2-inference-v.yaml for 768-v checkpoints "
                                            "(v-prediction, 768px) or configs/stable-diffusion/"
                                            "v2-inference.yaml for base checkpoints (eps, 512px)"),
    (lambda sd: with_in_channels(sd, 9), "configs/stable-diffusion/v2-inpainting-inference.yaml"),
    (lambda sd: with_in_channels(sd, 5), "configs/stable-diffusion/v2-midas-inference.yaml"),
    (lambda sd: with_in_channels(sd, 7), "configs/stable-diffusion/x4-upscaling.yaml"),
])
def test_mismatch_names_the_config_that_fits(tiny_model, tiny_files, change, expected):
    with pytest.raises(UserError, match="does not fit this checkpoint") as err:
        load_state_dict_into(tiny_model, change(tiny_files.state_dict), config_name="tiny.yaml")
    message = str(err.value)
    assert expected in message and "tiny.yaml" in message and "\n" not in message


def test_unrecognised_mismatch_lists_examples(tiny_model, tiny_files):
    sd = dict(tiny_files.state_dict)
    del sd["first_stage_model.decoder.conv_out.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(8, 32, 3, 3)
    with pytest.raises(UserError) as err:
        load_state_dict_into(tiny_model, sd)
    message = str(err.value)
    assert "1 missing, 1 unexpected, 1 shape mismatches" in message
    assert "model.diffusion_model.out.2.weight: checkpoint [8, 32, 3, 3] vs model [4, 32, 3, 3]" \
        in message
    assert "missing first_stage_model.decoder.conv_out.bias" in message


def test_non_strict_load_reports_instead_of_raising(tiny, tiny_files):
    model = tiny.build(seed=5)
    sd = with_in_channels(tiny_files.state_dict, 9)
    del sd["first_stage_model.decoder.conv_out.bias"]
    report = load_state_dict_into(model, sd, strict=False)
    assert not report.ok
    assert report.missing == ["first_stage_model.decoder.conv_out.bias"]
    assert report.mismatched == [(UNET_IN, (32, 9, 3, 3), (32, 4, 3, 3))]
    assert report.loaded == len(tiny_files.state_dict) - 2


def test_load_model_mismatch_names_config_path(tiny_files, tmp_path):
    save_file(with_context_dim(tiny_files.state_dict, 768), tmp_path / "sd1.safetensors")
    with pytest.raises(UserError) as err:
        load_model(tiny_files.config, tmp_path / "sd1.safetensors", device="cpu")
    assert str(tiny_files.config) in str(err.value) and "v1-inference.yaml" in str(err.value)


@pytest.mark.parametrize("shapes, expected", [
    ({UNET_IN: (320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (1280, 1536)},
     "v2-1-stable-unclip-l-inference.yaml"),
    ({UNET_IN: (320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (1280, 2048)},
     "v2-1-stable-unclip-h-inference.yaml"),
    ({UNET_IN: (320, 4, 3, 3), "control_model.zero_convs.0.0.weight": (320, 320, 1, 1)},
     "ControlNet"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers-format"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)},
     "autoencoder (VAE) alone"),
])
def test_suggest_config_other_families(shapes, expected):
    assert expected in suggest_config(shapes)


def test_suggest_config_unknown():
    assert suggest_config({"something": (1,)}) is None
    assert suggest_config({UNET_IN: (32, 4, 3, 3)}) is None


# ------------------------------------------------------------------------------ load_model paths

def test_default_model_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "REPO_ROOT", tmp_path)
    with pytest.raises(UserError, match="default model .* is missing; give the checkpoint and the config"):
        load_model()


def test_default_model_is_used_when_present(monkeypatch, tmp_path, tiny_files):
    monkeypatch.setattr(checkpoint, "REPO_ROOT", tmp_path)
    for path in (checkpoint.DEFAULT_CKPT, checkpoint.DEFAULT_CONFIG):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / checkpoint.DEFAULT_CKPT).write_bytes(tiny_files.safetensors.read_bytes())
    (tmp_path / checkpoint.DEFAULT_CONFIG).write_text(tiny_files.config.read_text())
    model = load_model(device="cpu")
    assert not model.training
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight,
                       tiny_files.state_dict[UNET_IN])


def test_ckpt_without_config_lists_configs(tiny_files, tmp_path):
    alone = tmp_path / "tiny-ldm.ckpt"  # the fixture's folder has tiny-ldm.yaml beside it
    alone.write_bytes(tiny_files.ckpt.read_bytes())
    with pytest.raises(UserError, match="tiny-ldm.ckpt' needs a config too: give one, or put it beside the "
                                        "checkpoint as 'tiny-ldm.yaml'.*v2-inference.yaml"):
        load_model(ckpt_path=alone)
    save_file(with_in_channels(tiny_files.state_dict, 9), tmp_path / "inpaint.safetensors")
    with pytest.raises(UserError, match=r"needs a config too \(use the config "
                                        r"configs/stable-diffusion/v2-inpainting"):
        load_model(ckpt_path=tmp_path / "inpaint.safetensors")


def test_config_without_ckpt(tiny_files):
    with pytest.raises(UserError, match="needs a checkpoint too"):
        load_model(config_path=tiny_files.config)


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed\n", "not valid YAML"),
    ("data: {}\n", "has no 'model' section"),
])
def test_bad_config_files(tiny_files, tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "bad.yaml", tiny_files.ckpt, device="cpu")
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "absent.yaml", tiny_files.ckpt, device="cpu")


def test_bad_device(tiny_files):
    with pytest.raises(UserError, match="unknown device"):
        load_model(tiny_files.config, tiny_files.ckpt, device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            load_model(tiny_files.config, tiny_files.ckpt, device="cuda")


def test_tiny_config_round_trips(tiny, tmp_path):
    # guards the fixture itself: the written YAML builds the same architecture
    path = tiny.write_config(tiny.config(), tmp_path / "c.yaml")
    assert checkpoint.load_config(path).model.params.unet_config.params.context_dim == 32


def test_unet_dtype_follows_the_config_on_cpu(tiny, tiny_files, tmp_path):
    for flag, expected in (("use_fp16", torch.float32), ("use_bf16", torch.bfloat16)):
        config = tiny.config()
        config["model"]["params"]["unet_config"]["params"][flag] = True
        path = tiny.write_config(config, tmp_path / f"{flag}.yaml")
        # forced: on a CPU without native bfloat16 use_bf16 runs float32 (tests/test_precision.py)
        model = load_model(path, tiny_files.ckpt, device="cpu", force_dtype=True)
        assert model.model.diffusion_model.dtype == expected
        assert model.first_stage_model.decoder.conv_out.weight.dtype == torch.float32


# ------------------------------------------------------------------------------ files that are not what they say
# Each is refused in one line that says what the file is and what to do; nothing in it runs.

SHIPPED_CONFIG = checkpoint.REPO_ROOT / checkpoint.DEFAULT_CONFIG


def write_code_pickle(path, marker, file_format="zip"):
    """A checkpoint-like file whose unpickling would create the folder ``marker``: torch.save's
    zip or legacy format, or a plain pickle (protocol 4)."""
    payload = {"state_dict": {"w": torch.ones(1)}, "payload": RunsCode(str(marker))}
    if file_format == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=file_format == "zip")
    return path


def add_zip_member(path, name, data):
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(name, data)


def archive_folder(path):
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()[0].split("/")[0]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch on the renamed plain pickle
@pytest.mark.parametrize("file_format, kind", [("zip", "zip"), ("legacy", "pickle"),
                                               ("pickle", "pickle")])
def test_pickle_named_safetensors_is_not_unpickled(tmp_path, file_format, kind):
    marker = tmp_path / "code-ran"
    path = write_code_pickle(tmp_path / "model.safetensors", marker, file_format)
    with pytest.raises(UserError, match=f"named .safetensors but is a PyTorch {kind} file, so it "
                                        f"was not unpickled; .* rename it to .ckpt") as err:
        read_state_dict(path)
    assert "\n" not in str(err.value) and not marker.exists()
    # renamed as advised, it is read weights-only, which refuses the payload
    with pytest.raises(UserError):
        read_state_dict(path.rename(tmp_path / "model.ckpt"))
    assert not marker.exists()


def test_zip_checkpoint_with_extra_members(tiny_files, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "extra.ckpt"
    path.write_bytes(tiny_files.ckpt.read_bytes())
    folder = archive_folder(path)
    # inside the archive's folder extra members are never read: the weights load
    add_zip_member(path, f"{folder}/payload.pkl", pickle.dumps(RunsCode(str(marker))))
    add_zip_member(path, f"{folder}/notes.txt", "notes")
    assert same(read_state_dict(path), tiny_files.state_dict)
    # outside it PyTorch refuses the archive
    add_zip_member(path, "payload.pkl", pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(UserError, match=r"torch.save file with 1 extra member\(s\) outside its "
                                        rf"'{folder}/' folder \(e.g. 'payload.pkl'\).*remove them") as err:
        read_state_dict(path)
    assert "\n" not in str(err.value) and not marker.exists()


def test_zip_archive_that_is_no_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "notes.ckpt", "w") as archive:
        archive.writestr("notes/readme.txt", "not weights")
    with pytest.raises(UserError, match=r"is a zip archive but not a torch.save file \(no "
                                        r"<folder>/data.pkl in it\)"):
        read_state_dict(tmp_path / "notes.ckpt")


@pytest.mark.parametrize("name", ["empty.ckpt", "empty.safetensors"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match=r"is empty \(0 bytes\); download or save it again"):
        read_state_dict(tmp_path / name)


def test_safetensors_with_unrelated_keys(tiny_files, tmp_path):
    save_file({"foo": torch.ones(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(UserError, match="this checkpoint shares no key with the model of config "
                                        ".*'foo'.*: it is not a weights file for this model") as err:
        load_model(tiny_files.config, tmp_path / "foo.safetensors", device="cpu")
    assert str(tiny_files.config) in str(err.value) and "\n" not in str(err.value)


def test_damaged_lightning_checkpoint_reports_the_damage(tmp_path):
    """Bookkeeping globals make the first read fail; the retry with placeholders then meets the
    damage, which is what the message must name (not "needs code execution")."""
    pl_callbacks = pytest.importorskip("pytorch_lightning.callbacks")
    whole = tmp_path / "whole.ckpt"
    # callbacks first, so unpickling meets the bookkeeping before the tensor storage
    torch.save({"callbacks": {pl_callbacks.ModelCheckpoint: {"best_model_score": np.float64(0.5)}},
                "state_dict": {"w": torch.arange(3.0)}}, whole)
    damaged = tmp_path / "damaged.ckpt"
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(damaged, "w") as target:
        for name in source.namelist():
            if not name.endswith("/data/0"):
                target.writestr(name, source.read(name))
    with pytest.raises(UserError, match=r"not a readable PyTorch file \(.*data/0.*\); it may be "
                                        r"truncated or corrupt") as err:
        read_state_dict(damaged)
    assert "code execution" not in str(err.value) and "\n" not in str(err.value)


def make_bad_checkpoint(kind, folder, marker):
    if kind == "pickle.safetensors":
        return write_code_pickle(folder / kind, marker, "legacy")
    if kind in ("zip.safetensors", "code.ckpt"):
        return write_code_pickle(folder / kind, marker)
    if kind == "stray-member.ckpt":
        path = folder / kind
        torch.save({"state_dict": {"w": torch.ones(1)}}, path)
        add_zip_member(path, "payload.pkl", pickle.dumps(RunsCode(str(marker))))
        return path
    if kind == "foo.safetensors":
        save_file({"foo": torch.ones(2)}, folder / kind)
        return folder / kind
    if kind == "directory":
        (folder / kind).mkdir()
        return folder / kind
    (folder / kind).write_bytes(b"")
    return folder / kind


@pytest.mark.parametrize("kind, message", [
    ("pickle.safetensors", "is named .safetensors but is a PyTorch pickle file"),
    ("zip.safetensors", "is named .safetensors but is a PyTorch zip file"),
    ("code.ckpt", "needs code execution to load (posix.mkdir)"),
    ("stray-member.ckpt", "extra member(s) outside its 'stray-member/' folder"),
    ("foo.safetensors", "shares no key with the model of config"),
    ("directory", "is a directory; give the path to a .ckpt or .safetensors file inside it"),
    ("empty.ckpt", "is empty (0 bytes)"),
    ("empty.safetensors", "is empty (0 bytes)"),
])
def test_bad_checkpoints_through_txt2img(scripts, tmp_path, capsys, kind, message):
    marker = tmp_path / "code-ran"
    path = make_bad_checkpoint(kind, tmp_path, marker)
    txt2img = scripts.load("txt2img")
    assert txt2img.main(["--ckpt", str(path), "--config", str(SHIPPED_CONFIG), "--device", "cpu",
                         "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ loading without a second copy
# load_model maps the file (torch.load mmap, safetensors), builds the model without random
# initialisation and makes the mapped tensors its parameters (assign): the weights are in RAM once.

def mapped_from(tensor, path):
    """Whether ``tensor``'s memory lies in a mapping of the file ``path`` (Linux /proc/self/maps)."""
    ptr, name = tensor.data_ptr(), str(path.resolve())
    with open("/proc/self/maps") as maps:
        lines = maps.readlines()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == name:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= ptr < end:
                return True
    return False


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")


def plainly_loaded(tiny, path):
    """The tiny model as the official code loads it: random init, torch.load, load_state_dict copies."""
    model = tiny.build(seed=9)
    model.load_state_dict(read_state_dict(path))
    return model.eval()


def same_model(a, b):
    return same(a.state_dict(), b.state_dict()) and same(dict(a.named_buffers()), dict(b.named_buffers()))


def save_weights(sd, path):
    """``sd`` as a .safetensors file or, for any other suffix, a Lightning-style torch file."""
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return path


@needs_proc_maps
@pytest.mark.parametrize("name", ["ckpt", "safetensors"])
def test_load_model_maps_the_weights_from_the_file(tiny, tiny_files, name):
    path = getattr(tiny_files, name)
    model, reference = load_model(tiny_files.config, path, device="cpu"), plainly_loaded(tiny, path)
    assert same_model(model, reference)
    assert all(mapped_from(p, path) for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_half_precision_file_into_a_float32_model(tiny_files, tmp_path, suffix):
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_files.state_dict.items()}
    model = load_model(tiny_files.config, save_weights(half, tmp_path / f"half{suffix}"), device="cpu")
    loaded = model.state_dict()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float())
               for k, v in half.items() if v.is_floating_point())


def test_legacy_torch_file_is_read_whole(tiny, tiny_files, tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": tiny_files.state_dict}, path, _use_new_zipfile_serialization=False)
    assert same(read_state_dict(path), tiny_files.state_dict)
    assert same_model(load_model(tiny_files.config, path, device="cpu"), plainly_loaded(tiny, path))


def test_one_tensor_under_two_keys_becomes_two_weights(tiny_files, tmp_path):
    """A file may store tied weights once; changing one weight in place must not change the other."""
    sd = dict(tiny_files.state_dict)
    first, second = "model.diffusion_model.out.0.weight", "model.diffusion_model.out.0.bias"
    sd[second] = sd[first]
    torch.save({"state_dict": sd}, tmp_path / "tied.ckpt")
    model = load_model(tiny_files.config, tmp_path / "tied.ckpt", device="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[first].add_(1.0)
    assert torch.equal(params[second], sd[first]) and torch.equal(params[first], sd[first] + 1)


@needs_proc_maps
@pytest.mark.parametrize("name", ["ckpt", "safetensors"])
def test_lora_merge_and_ema_swap_write_to_mapped_weights_not_the_file(tiny, tiny_files, tmp_path, name):
    from ldm.modules.lora import LoraMerger, lora_use
    ema = tiny.build(tiny.config(use_ema=True), seed=2)
    with torch.no_grad():
        for buffer in ema.model_ema.buffers():
            if buffer.dim():  # the averaged weights, not decay or the update count
                buffer.add_(0.5)
    path = save_weights(ema.state_dict(), tmp_path / f"ema.{name}")
    written = path.read_bytes()
    config = tiny.write_config(tiny.config(use_ema=True), tmp_path / "ema.yaml")
    model = load_model(config, path, device="cpu")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    q = dict(model.named_parameters())[key]
    assert mapped_from(q, path)
    original = {k: v.clone() for k, v in model.state_dict().items()}

    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    save_file({f"{layer}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{layer}.lora_up.weight": torch.randn(32, 4, generator=g), f"{layer}.alpha": torch.tensor(4.0)},
              tmp_path / "lora.safetensors")
    merger = LoraMerger(model)
    with merger.applied([lora_use(merger.load(tmp_path / "lora.safetensors"), 1.0)]):
        assert not torch.equal(q, original[key])
    with model.ema_scope():
        assert torch.equal(q, original["model_ema." + key[len("model."):].replace(".", "")])
    assert same(model.state_dict(), original)
    assert path.read_bytes() == written


def write_safetensors_misaligned(sd, path):
    """``sd`` as a safetensors file whose tensors all start one byte off their alignment: a
    one-byte position_ids (ignored on load) first; safetensors' own writer never does this."""
    import json
    import struct
    names = {torch.float32: "F32", torch.int64: "I64"}
    header = {checkpoint.POSITION_IDS_KEY: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    blobs, offset = [b"\0"], 1
    for key, value in sd.items():
        data = value.contiguous().numpy().tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def test_misaligned_tensors_are_copied_to_aligned_memory(tiny, tiny_files, tmp_path):
    path = write_safetensors_misaligned(tiny_files.state_dict, tmp_path / "misaligned.safetensors")
    assert read_state_dict(path)[UNET_IN].data_ptr() % 4 == 1   # as safetensors maps it
    model = load_model(tiny_files.config, path, device="cpu")
    assert all(t.data_ptr() % t.element_size() == 0 for t in model.state_dict().values())
    assert same_model(model, plainly_loaded(tiny, tiny_files.ckpt))
