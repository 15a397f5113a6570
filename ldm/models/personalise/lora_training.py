"""LoRA (Hu et al. 2021) trained on a frozen model the way kohya's sd-scripts trains it, saved as kohya's file.

Which layers (kohya's ``networks/lora.py`` rule, named through :mod:`ldm.modules.lora.names`):

``transformer``   every Linear / Conv2d of the U-Net's transformer blocks: proj_in, proj_out, attn1 and attn2
                  q/k/v/out, ff (kohya's default)
``resnet``        every Linear / Conv2d of the res blocks, downsamplers and upsamplers ("LoCon", kohya's
                  ``conv_dim``): the 3x3 convs at ``conv_rank`` / ``conv_alpha``, the time projection and
                  the 1x1 shortcuts at ``rank`` / ``alpha``
text encoder      q/k/v/out projections and the MLP of every layer the encoder runs (``train_text_encoder``)

An adapted layer computes ``W x + (alpha / rank) * up(down(x))``; down starts as ``nn.Linear``'s default
(kaiming-uniform with a = sqrt(5)) and up at zero, so training starts exactly at the base model. The layers
are attached by forward hooks on the adapted modules, inside ``attached()`` only; a fused q/k/v projection
takes each change on its block of output rows. Where the base uses a weight without calling its module
(OpenCLIP's ``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` itself), that weight is
parametrized as ``W + (alpha / rank) * up @ down`` for the time attached, and the original Parameter put back.

The file, ``<run>/adapters/<name>.safetensors``, is kohya's (:mod:`ldm.modules.lora.kohya_writer`): layers
named ``lora_unet_<diffusers path>`` / ``lora_te_<Hugging Face CLIP path>`` with dots made underscores, and
the ``ss_*`` metadata; ``--lora FILE`` reads it. SD 2.x's OpenCLIP text encoder is named as kohya's 23-layer
Hugging Face conversion of it: its fused q/k/v rows as q_proj / k_proj / v_proj, and the last block, which
the "penultimate" layer never runs, left out. kohya knows SD 1.x and 2.x only, so ``ss_base_model_version``
says sd_v2 for an OpenCLIP text encoder and sd_v1 for any other (the shipped shapes model included).
"""
import contextlib
import json
import logging
import math
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ldm.checkpoint import file_hash
from ldm.data.prior_preservation import PriorPreservationDataset
from ldm.errors import UserError
from ldm.models.personalise.adapter_training import AdapterTraining
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.lora.kohya_writer import (
    NETWORK_MODULE,
    base_model_version,
    legacy_model_hash,
    modelspec_metadata,
    save_kohya_lora,
    save_precision_dtype,
)
from ldm.modules.lora.names import ModuleNames, kohya_name, unet_block_kind

log = logging.getLogger(__name__)

UNET_TARGETS = ("transformer", "resnet")
RUN_FACTS_KEY = "lora_run"  # checkpoint entry: what the metadata needs from batches already trained on
TEXT_LAYER = re.compile(r"\.layers\.(\d+)\.")
MIXED_PRECISION = {"32-true": "no", "32": "no", "16-mixed": "fp16", "bf16-mixed": "bf16"}


class LoraLayer(nn.Module):
    """The LoRA of one layer: ``lora_down``, ``lora_up`` and the ``alpha`` buffer, kohya's names; its output is
    ``(alpha / rank) * up(down(x))``. ``conv``: the Conv2d adapted (down takes its kernel, stride and padding;
    up is 1x1), None for a Linear layer."""

    def __init__(self, in_features, out_features, rank, alpha, conv=None):
        super().__init__()
        if conv is None:
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(in_features, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                       bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank

    def forward(self, x):
        return self.lora_up(self.lora_down(x)) * self.scale

    def weight_change(self):
        """``(alpha / rank) * up @ down`` ``[out, in]`` of a Linear layer's LoRA."""
        return (self.lora_up.weight @ self.lora_down.weight) * self.scale


class _WeightChange(nn.Module):
    """A parametrization ``W -> W + sum of LoRA changes``, each on its rows of ``W`` (None: all of it)."""

    def __init__(self, parts):
        super().__init__()
        self.parts = tuple(parts)  # ((LoraLayer, rows), ...): a tuple, so they do not become the base's submodules

    def forward(self, weight):
        for layer, rows in self.parts:
            change = layer.weight_change().to(weight.dtype)
            if rows is not None:
                change = F.pad(change, (0, 0, rows[0], weight.shape[0] - rows[1]))  # [rows, in] -> [out, in]
            weight = weight + change
        return weight


def _adding_output(layer, rows, width):
    def hook(module, inputs, output):
        change = layer(inputs[0])
        if rows is not None:
            change = F.pad(change, (rows[0], width - rows[1]))  # zeros beside the q, k or v block of a fused output
        return output + change
    return hook


class LoraTraining(AdapterTraining):
    """A LoRA of ``rank`` with ``alpha`` (scale alpha / rank, as kohya) on the U-Net layers of ``targets``
    (``transformer``, ``resnet``; see the module doc) when ``train_unet``, and on the text encoder's when
    ``train_text_encoder``. ``conv_rank`` / ``conv_alpha``: of the 3x3 convs (default ``rank`` / ``alpha``).
    ``name``: the exported file's name and ``ss_output_name``; ``save_precision``: fp32 (or "float"), fp16 or
    bf16, as kohya's ``--save_precision``. Other arguments: :class:`AdapterTraining`."""

    def __init__(self, rank=4, alpha=1.0, targets=("transformer",), conv_rank=None, conv_alpha=None, train_unet=True,
                 train_text_encoder=False, name="lora", save_precision="fp32", **training):
        # checked before the base model is loaded, so that a bad config fails at once
        rank, alpha = _checked_rank("rank", rank), _checked_alpha("alpha", alpha)
        conv_rank = rank if conv_rank is None else _checked_rank("conv_rank", conv_rank)
        conv_alpha = alpha if conv_alpha is None else _checked_alpha("conv_alpha", conv_alpha)
        targets = _checked_targets(targets, train_unet, train_text_encoder)
        name, save_dtype = _checked_name(name), save_precision_dtype(save_precision)
        super().__init__(**training)
        self.rank, self.alpha, self.conv_rank, self.conv_alpha = rank, alpha, conv_rank, conv_alpha
        self.targets, self.output_name, self.save_dtype = targets, name, save_dtype
        self.train_unet, self.train_text_encoder = bool(train_unet), bool(train_text_encoder)
        self.needs_prompt_gradients = self.train_text_encoder
        layers, self._hooked, self._parametrized = {}, [], {}
        chosen = kohya_targets(self.base, targets, self.train_unet, self.train_text_encoder)
        for name, target in chosen.items():
            layers[name] = self._plan(name, target)
        self.lora = nn.ModuleDict(layers)
        log.info("LoRA %r: %d layers (%s), %d parameters", self.output_name, len(layers), ", ".join(
            f"{sum(n.startswith(p) for n in layers)} {p[:-1]}" for p in ("lora_unet_", "lora_te_")),
            sum(p.numel() for p in self.lora.parameters()))
        self._run_facts = {"tag_frequency": {}, "resolution": None, "batch_size": None}
        self._started_at = self._session_id = self._seed = None
        self._base_hashes = None

    # ------------------------------------------------------------------ how each layer is attached
    def _plan(self, name, target):
        """The LoraLayer for ``target``, and how attached() attaches it (a hook, or a weight parametrization)."""
        module_path, attribute = target.param.rsplit(".", 1)
        owner = self.base.get_submodule(module_path)
        parent = self.base.get_submodule(module_path.rpartition(".")[0])
        weight = getattr(owner, attribute)
        out_features = weight.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
        if isinstance(owner, nn.MultiheadAttention) or isinstance(parent, nn.MultiheadAttention):
            layer = LoraLayer(weight.shape[1], out_features, self.rank, self.alpha)
            self._parametrized.setdefault((owner, attribute), []).append((name, target.rows))
            return layer
        if attribute != "weight" or not isinstance(owner, (nn.Linear, nn.Conv2d)) or \
                (isinstance(owner, nn.Conv2d) and owner.groups != 1):
            raise UserError(f"LoRA cannot adapt {target.describe()}: it is the {attribute} of a "
                            f"{type(owner).__name__}, not of a Linear or ungrouped Conv2d layer")
        conv = owner if isinstance(owner, nn.Conv2d) else None
        wide_kernel = conv is not None and tuple(conv.kernel_size) != (1, 1)
        rank, alpha = (self.conv_rank, self.conv_alpha) if wide_kernel else (self.rank, self.alpha)
        self._hooked.append((name, owner, target.rows, weight.shape[0]))
        return LoraLayer(weight.shape[1], out_features, rank, alpha, conv=conv)

    def adapter_parameters(self):
        return list(self.lora.parameters())

    @contextlib.contextmanager
    def attached(self):
        handles, parametrized = [], []
        try:
            for name, module, rows, width in self._hooked:
                handles.append(module.register_forward_hook(_adding_output(self.lora[name], rows, width)))
            for (owner, attribute), parts in self._parametrized.items():
                parametrize.register_parametrization(
                    owner, attribute, _WeightChange((self.lora[name], rows) for name, rows in parts))
                parametrized.append((owner, attribute))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for owner, attribute in parametrized:
                parametrize.remove_parametrizations(owner, attribute, leave_parametrized=False)

    # ------------------------------------------------------------------ what the metadata records of the run
    def on_fit_start(self):
        self._started_at = time.time()
        self._session_id = random.randint(0, 2 ** 32)  # kohya's ss_session_id
        self._seed = torch.initial_seed()

    def on_train_batch_start(self, batch, batch_idx):
        facts = self._run_facts
        images = batch.get(self.base.first_stage_key)
        if facts["resolution"] is None and images is not None:
            facts["resolution"] = [int(images.shape[2]), int(images.shape[1])]  # [B, H, W, C] -> (width, height)
            facts["batch_size"] = len(images)
        # kohya counts each image's tags once: the captions of the first epoch's worth of steps stand in for a
        # dataset that does not list its captions (see _dataset_facts)
        if self.global_step < self.trainer.num_training_batches:
            counts = Counter(facts["tag_frequency"])
            for caption in batch.get(self.base.cond_stage_key) or []:
                if isinstance(caption, str):
                    counts.update(_tags(caption))
            facts["tag_frequency"] = dict(counts)

    def on_save_checkpoint(self, checkpoint):
        checkpoint[RUN_FACTS_KEY] = {key: value for key, value in self._run_facts.items()}
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint):
        self._run_facts.update(checkpoint.get(RUN_FACTS_KEY) or {})

    # ------------------------------------------------------------------ export
    def export(self, directory, step):
        layers = {name: layer.state_dict() for name, layer in self.lora.items()}
        path = save_kohya_lora(directory / f"{self.output_name}.safetensors", layers, self.kohya_metadata(step),
                               self.save_dtype)
        log.info("LoRA %r (%d layers, step %d) written to %s", self.output_name, len(layers), step, path)

    def kohya_metadata(self, step):
        """The ``ss_*`` and ``modelspec.*`` fields kohya writes (values as given; the writer makes them strings)."""
        now = time.time()
        facts, trainer = self._run_facts, self._trainer  # no trainer when exported outside a run
        encoder = self.base.cond_stage_model
        clip_skip = getattr(encoder, "clip_skip", 1)
        v2 = isinstance(encoder, FrozenOpenCLIPEmbedder)
        v_parameterization = self.base.parameterization == "v"
        dataset, regularisation = _train_datasets(trainer)
        images = len(dataset) if hasattr(dataset, "__len__") else None
        folder, repeats, tags = _dataset_facts(dataset, facts["tag_frequency"])
        batch_size = facts["batch_size"]
        metadata = {
            "ss_session_id": self._session_id, "ss_training_started_at": self._started_at or now,
            "ss_training_finished_at": now, "ss_output_name": self.output_name, "ss_learning_rate": self.learning_rate,
            "ss_network_module": NETWORK_MODULE, "ss_network_dim": self.rank, "ss_network_alpha": self.alpha,
            "ss_network_dropout": None, "ss_v2": v2,
            "ss_base_model_version": base_model_version(v2, v_parameterization),
            "ss_steps": int(step), "ss_epoch": self.current_epoch,
            "ss_num_train_images": images, "ss_batch_size_per_device": batch_size,
            "ss_resolution": tuple(facts["resolution"]) if facts["resolution"] else None,
            "ss_clip_skip": clip_skip if clip_skip != 1 else None,  # kohya: None for the model's own layer
            "ss_seed": self._seed, "ss_sd_model_name": self.base_ckpt.name,
            "ss_tag_frequency": json.dumps({folder: tags}),
            "ss_dataset_dirs": json.dumps({folder: {"n_repeats": repeats,
                                                    "img_count": images // repeats if images else images}}),
        }
        if regularisation is not None:   # kohya's reg folders: counted apart from the training images
            reg_images = len(regularisation.prior)
            reg_folder, reg_repeats, _ = _dataset_facts(regularisation.prior, {})
            metadata.update({"ss_num_reg_images": reg_images, "ss_prior_loss_weight": regularisation.prior_loss_weight,
                             "ss_reg_dataset_dirs": json.dumps({reg_folder: {
                                 "n_repeats": reg_repeats, "img_count": reg_images // reg_repeats}})})
        metadata["ss_sd_model_hash"], metadata["ss_new_sd_model_hash"] = self._hashes_of_base()
        if "resnet" in self.targets and self.train_unet:
            # kohya records its --network_args as typed: strings
            metadata["ss_network_args"] = json.dumps({"conv_dim": str(self.conv_rank),
                                                      "conv_alpha": str(self.conv_alpha)})
        if trainer is not None:
            accumulate = trainer.accumulate_grad_batches
            metadata.update({
                "ss_max_train_steps": trainer.max_steps, "ss_num_batches_per_epoch": trainer.num_training_batches,
                "ss_gradient_accumulation_steps": accumulate,
                "ss_total_batch_size": batch_size * accumulate * trainer.world_size if batch_size else None,
                "ss_mixed_precision": MIXED_PRECISION.get(str(trainer.precision), str(trainer.precision)),
                "ss_optimizer": _optimizer_name(trainer)})
        metadata.update(modelspec_metadata(v2, v_parameterization, self.output_name, facts["resolution"], now))
        return metadata

    def _hashes_of_base(self):
        """(A1111's old 8-digit hash, full sha256) of the base weights file, computed once."""
        if self._base_hashes is None:
            self._base_hashes = legacy_model_hash(self.base_ckpt), file_hash(self.base_ckpt, length=64)
        return self._base_hashes


# ---------------------------------------------------------------------------------------------------- helpers
def kohya_targets(model, targets=("transformer",), unet=True, text_encoder=False):
    """``{kohya name: Target}`` of the layers kohya's LoRA adapts in ``model`` (a LatentDiffusion), in the model's
    order: the U-Net layers of ``targets`` when ``unet``, the text encoder's when ``text_encoder``."""
    names = ModuleNames.for_model(model)
    chosen = {}
    if unet:
        chosen.update({kohya_name("unet", path): target for path, target in names.unet.items()
                       if unet_block_kind(path) in targets})
    if text_encoder:
        if not names.text_encoder:
            raise UserError(f"train_text_encoder: {names.text_encoder_note}; train the U-Net only "
                            f"(train_text_encoder: false)")
        run = _text_layers_run(model.cond_stage_model)
        chosen.update({kohya_name("text_encoder", path): target for path, target in names.text_encoder.items()
                       if run is None or int(TEXT_LAYER.search(path).group(1)) < run})
    return chosen


def _text_layers_run(encoder):
    """How many text-encoder layers the encoder's configured layer runs (None: all). SD 2.x's "penultimate"
    skips the last OpenCLIP block, which kohya's 23-layer conversion of that encoder does not have."""
    if isinstance(encoder, FrozenOpenCLIPEmbedder):
        return len(encoder.model.transformer.resblocks) - encoder.layer_idx
    return None


def _train_datasets(trainer):
    """(training images, the :class:`PriorPreservationDataset` holding the regularisation images or None)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    dataset = (getattr(datamodule, "datasets", None) or {}).get("train")
    dataset = getattr(dataset, "data", dataset)  # inside main.py's WrappedDataset
    if isinstance(dataset, PriorPreservationDataset):
        return dataset.instance, dataset
    return dataset, None


def _dataset_facts(dataset, seen_tags):
    """(folder name, repeats, tag counts) for kohya's ``ss_dataset_dirs`` and ``ss_tag_frequency``. A dataset
    that lists its captions (a captioned image folder) is counted per image, as kohya counts; for any other the
    tags of the captions trained on in the first epoch's worth of steps stand in."""
    if dataset is None:
        return "train", 1, seen_tags
    paths, captions = getattr(dataset, "paths", None), getattr(dataset, "captions", None)
    folder = Path(paths[0]).parent.name if paths else type(dataset).__name__
    if not isinstance(captions, (list, tuple)):
        return folder, int(getattr(dataset, "repeats", 1)), seen_tags
    return folder, int(getattr(dataset, "repeats", 1)), dict(Counter(tag for caption in captions
                                                                     for tag in _tags(caption)))


def _tags(caption):
    """kohya's tags of a caption: its comma-separated parts, stripped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def _optimizer_name(trainer):
    """kohya's ``ss_optimizer``: the optimizer class's module path and name, with its weight decay."""
    if not trainer.optimizers:
        return None
    optimizer = trainer.optimizers[0]
    kind = type(optimizer)
    return f"{kind.__module__}.{kind.__name__}(weight_decay={optimizer.defaults.get('weight_decay')})"


def _checked_rank(what, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer (kohya's network_dim; 4 to 32 is usual), got {value!r}")
    return value


def _checked_alpha(what, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{what} must be a positive number (scale = alpha / rank; alpha = rank gives scale 1), "
                        f"got {value!r}")
    return float(value)


def _checked_targets(targets, train_unet, train_text_encoder):
    targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
    unknown = [t for t in targets if t not in UNET_TARGETS]
    if unknown:
        raise UserError(f"unknown LoRA targets {unknown}; the U-Net targets are {', '.join(UNET_TARGETS)}")
    if train_unet and not targets:
        raise UserError(f"train_unet needs targets (any of {', '.join(UNET_TARGETS)})")
    if not train_unet and not train_text_encoder:
        raise UserError("train_unet and train_text_encoder are both false: there is nothing to train")
    return targets


def _checked_name(name):
    if not isinstance(name, str) or not name.strip() or name != name.strip() or any(c in name for c in "/\\"):
        raise UserError(f"name must be a file name without slashes or surrounding spaces (it names the exported "
                        f"LoRA), got {name!r}")
    return name
