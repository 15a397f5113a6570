"""Which of our parameters a LoRA file means when it names a layer.

LoRA files name layers as the community's models do, never as ours: the U-Net by its diffusers module
path (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``), the text encoder by its Hugging
Face CLIP path (``text_model.encoder.layers.3.self_attn.q_proj``). kohya and LyCORIS write that path
with every ``.`` made ``_`` behind ``lora_unet_`` / ``lora_te_``; diffusers and PEFT keep the dots behind
``unet.`` / ``text_encoder.``. Our modules keep the official ldm names (``input_blocks.4.1...``).

This module builds, for one model, the table from every such name to a :class:`Target`: the weight it
changes and, where our text encoder fuses q, k and v into one ``in_proj_weight`` (OpenCLIP, SD 2.x),
the block of rows. The U-Net half is derived from the U-Net's own config (levels, res blocks per level,
attention resolutions), walking the blocks in the order ``UNetModel`` builds them, so it holds for any
SD-like U-Net and not only for the 4-level SD one. kohya names are matched against the underscore forms
of the known paths (as kohya itself resolves them), never by guessing where an underscore was a dot.

SDXL (two text encoders, ``lora_te1_`` / ``lora_te2_``) is out of scope: its U-Net and encoders are not
models this code builds.
"""
from dataclasses import dataclass, field

from ldm.errors import UserError

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
KOHYA_UNET = "lora_unet_"
KOHYA_TEXT = "lora_te_"

# diffusers ResnetBlock2D layer -> our ResBlock layer
RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}
# the layers of one diffusers BasicTransformerBlock; ours has the same names
TRANSFORMER_BLOCK_LAYERS = tuple(f"{attn}.{layer}" for attn in ("attn1", "attn2")
                                 for layer in ("to_q", "to_k", "to_v", "to_out.0")) + ("ff.net.0.proj", "ff.net.2")
# the layers of one Hugging Face CLIPEncoderLayer that LoRA trainers adapt
CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")
# the diffusers blocks whose Linear and Conv2d layers kohya's LoRA adapts (sd-scripts networks/lora.py):
# Transformer2DModel always; ResnetBlock2D, Downsample2D and Upsample2D only with conv_dim ("LoCon")
KOHYA_TRANSFORMER_GROUPS = ("attentions",)
KOHYA_RESNET_GROUPS = ("resnets", "downsamplers", "upsamplers")


@dataclass(frozen=True)
class Target:
    """The weight a LoRA module changes: ``param`` is its key in the model's state dict; ``rows`` the
    (start, stop) rows of a fused q/k/v weight, None for the whole weight. ``part`` is "unet" or
    "text_encoder" (they take separate multipliers)."""
    part: str
    param: str
    rows: tuple = None

    def describe(self):
        return self.param if self.rows is None else f"{self.param}[{self.rows[0]}:{self.rows[1]}]"


def kohya_name(part, path):
    """kohya's name for the layer at ``path`` (a diffusers U-Net path for ``part`` "unet", a Hugging Face
    CLIP path for "text_encoder"): the path behind ``lora_unet_`` / ``lora_te_`` with every "." made "_"."""
    return (KOHYA_UNET if part == "unet" else KOHYA_TEXT) + path.replace(".", "_")


def unet_block_kind(path):
    """Which kohya target group the diffusers U-Net layer at ``path`` belongs to: "transformer" (proj_in,
    proj_out, attention and feed-forward of a Transformer2DModel), "resnet" (a ResnetBlock2D, Downsample2D or
    Upsample2D), or None (conv_in, conv_out, the time embedding: kohya's LoRA never adapts them)."""
    groups = set(path.split("."))
    if groups.intersection(KOHYA_TRANSFORMER_GROUPS):
        return "transformer"
    if groups.intersection(KOHYA_RESNET_GROUPS):
        return "resnet"
    return None


# ---------------------------------------------------------------------------------------------------- U-Net
@dataclass(frozen=True)
class UNetLayout:
    """The config values that decide the U-Net's block indices and channel counts."""
    model_channels: int
    channel_mult: tuple
    num_res_blocks: tuple          # per level
    attention_resolutions: tuple
    transformer_depth: int = 1

    @classmethod
    def from_config(cls, params):
        """From a ``UNetModel`` config's ``params`` (a YAML ``unet_config.params`` mapping)."""
        if not params.get("use_spatial_transformer", False):
            raise UserError("LoRA needs a U-Net with use_spatial_transformer: True (the Stable Diffusion U-Net); "
                            "this one has the older AttentionBlock, which LoRA files do not name")
        if params.get("num_attention_blocks") is not None or params.get("resblock_updown", False):
            raise UserError("LoRA names follow the Stable Diffusion U-Net layout; a U-Net with "
                            "num_attention_blocks or resblock_updown has no diffusers equivalent")
        mult = tuple(params["channel_mult"])
        res = params["num_res_blocks"]
        res = tuple(res) if isinstance(res, (list, tuple)) else (res,) * len(mult)
        depth = params.get("transformer_depth", 1)
        return cls(params["model_channels"], mult, res, tuple(params["attention_resolutions"]), depth)

    @classmethod
    def from_unet(cls, unet):
        """From a built ``UNetModel`` (its attributes, and the depth of its first spatial transformer)."""
        depths = [len(m.transformer_blocks) for m in unet.modules() if hasattr(m, "transformer_blocks")]
        return cls(unet.model_channels, tuple(unet.channel_mult), tuple(unet.num_res_blocks),
                   tuple(unet.attention_resolutions), depths[0] if depths else 1)


def unet_module_names(layout):
    """``{diffusers module path: our module path}`` for every layer a LoRA may adapt in a U-Net of
    ``layout`` (our path without the ``model.diffusion_model.`` prefix).

    Walks the blocks in the order ``UNetModel`` builds them. Our ``input_blocks`` are ``conv_in``, then
    per level its res blocks (each with its spatial transformer where the level's downsampling factor
    is in ``attention_resolutions``) and a downsampler after every level but the last; diffusers groups
    the same layers as ``down_blocks.<level>.resnets/attentions.<i>`` and ``downsamplers.0``. The
    ``output_blocks`` run the levels backwards with one extra res block each, the upsampler inside the
    level's last block; diffusers numbers those ``up_blocks`` from the deepest level.
    """
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2"}

    def resnet(theirs, ours, ch_in, ch_out):
        for layer, our_layer in RESNET_LAYERS.items():
            if layer != "conv_shortcut" or ch_in != ch_out:  # a 1x1 skip conv only where channels change
                names[f"{theirs}.{layer}"] = f"{ours}.{our_layer}"

    def transformer(theirs, ours):
        for layer in ("proj_in", "proj_out"):
            names[f"{theirs}.{layer}"] = f"{ours}.{layer}"
        for depth in range(layout.transformer_depth):
            for layer in TRANSFORMER_BLOCK_LAYERS:
                names[f"{theirs}.transformer_blocks.{depth}.{layer}"] = f"{ours}.transformer_blocks.{depth}.{layer}"

    levels = list(enumerate(layout.channel_mult))
    ch, ds, block = layout.model_channels, 1, 1
    skip_channels = [ch]  # what each input block hands to its output block
    for level, mult in levels:
        for i in range(layout.num_res_blocks[level]):
            resnet(f"down_blocks.{level}.resnets.{i}", f"input_blocks.{block}.0", ch, mult * layout.model_channels)
            ch = mult * layout.model_channels
            if ds in layout.attention_resolutions:
                transformer(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{block}.1")
            skip_channels.append(ch)
            block += 1
        if level != len(levels) - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
            skip_channels.append(ch)
            block += 1
            ds *= 2

    resnet("mid_block.resnets.0", "middle_block.0", ch, ch)
    transformer("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2", ch, ch)

    block = 0
    for up, (level, mult) in enumerate(reversed(levels)):
        attention = ds in layout.attention_resolutions
        for i in range(layout.num_res_blocks[level] + 1):
            ch_in = ch + skip_channels.pop()
            resnet(f"up_blocks.{up}.resnets.{i}", f"output_blocks.{block}.0", ch_in, mult * layout.model_channels)
            ch = mult * layout.model_channels
            if attention:
                transformer(f"up_blocks.{up}.attentions.{i}", f"output_blocks.{block}.1")
            if level and i == layout.num_res_blocks[level]:
                names[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{block}.{2 if attention else 1}.conv"
                ds //= 2
            block += 1
    return names


# --------------------------------------------------------------------------------------------- text encoder
@dataclass(frozen=True)
class TextEncoderLayout:
    """Where one family of our text encoders keeps the layers of a CLIP encoder layer.

    ``layers`` is the module list under ``cond_stage_model``; ``params`` maps each Hugging Face layer
    name to (our weight inside the layer, index of its row block in a fused q/k/v weight or None).
    """
    name: str
    layers: str
    params: dict = field(default_factory=dict)

    def first_key(self):
        return f"{self.layers}.0.{next(iter(self.params.values()))[0]}"


def _fused_qkv(name, layers, qkv, out_proj, fc1, fc2):
    return TextEncoderLayout(name, layers, {
        "self_attn.q_proj": (qkv, 0), "self_attn.k_proj": (qkv, 1), "self_attn.v_proj": (qkv, 2),
        "self_attn.out_proj": (out_proj, None), "mlp.fc1": (fc1, None), "mlp.fc2": (fc2, None)})


TEXT_ENCODER_LAYOUTS = (
    # SD 1.x FrozenCLIPEmbedder: a Hugging Face CLIPTextModel, the names LoRA files use
    TextEncoderLayout("Hugging Face CLIP", "transformer.text_model.encoder.layers",
                      {name: (f"{name}.weight", None) for name in CLIP_LAYER_MODULES}),
    # SD 2.x FrozenOpenCLIPEmbedder: nn.MultiheadAttention keeps q, k, v as rows of in_proj_weight, the
    # split kohya's SD 2 conversion makes (torch.chunk(in_proj_weight, 3)); c_fc / c_proj are fc1 / fc2
    _fused_qkv("OpenCLIP", "model.transformer.resblocks", "attn.in_proj_weight", "attn.out_proj.weight",
               "mlp.c_fc.weight", "mlp.c_proj.weight"),
    # CLIPTokenTransformerEmbedder (the shipped shapes model): one qkv Linear, then proj and a 2-layer MLP
    _fused_qkv("CLIPTokenTransformerEmbedder", "blocks", "attn.qkv.weight", "attn.proj.weight",
               "mlp.0.weight", "mlp.2.weight"),
)


def text_encoder_layout(shapes):
    """The :data:`TEXT_ENCODER_LAYOUTS` entry whose weights ``shapes`` (``{key under cond_stage_model.:
    shape}``) has, or None."""
    for layout in TEXT_ENCODER_LAYOUTS:
        if layout.first_key() in shapes:
            return layout
    return None


def text_encoder_targets(shapes):
    """``{Hugging Face module path: Target}`` for the text encoder whose weights are ``shapes``
    (``{key under cond_stage_model.: shape}``); empty for a text encoder of no known layout."""
    layout = text_encoder_layout(shapes)
    if layout is None:
        return {}
    targets = {}
    layer = 0
    while f"{layout.layers}.{layer}.{next(iter(layout.params.values()))[0]}" in shapes:
        for hf_name, (ours, block) in layout.params.items():
            param = f"{layout.layers}.{layer}.{ours}"
            rows = None
            if block is not None:
                width = shapes[param][0] // 3  # [3 * D, D]: q, k, v stacked
                rows = (block * width, (block + 1) * width)
            targets[f"text_model.encoder.layers.{layer}.{hf_name}"] = Target("text_encoder", TEXT_PREFIX + param, rows)
        layer += 1
    return targets


# ----------------------------------------------------------------------------------------------- one model
class ModuleNames:
    """Every name a LoRA file may give a layer of one model, resolved to that model's weights.

    ``unet`` / ``text_encoder``: ``{diffusers or Hugging Face module path: Target}``; ``shapes``: the
    model's ``{state-dict key: shape}``. :meth:`resolve` takes a file's module name in any supported
    spelling: a kohya name (``lora_unet_<path with _>``, ``lora_te_<path with _>``, and also the
    ``lora_unet_input_blocks_...`` spelling of our own names that SAI-style files use), or a dotted path
    with or without a ``unet.`` / ``text_encoder.`` / ``base_model.model.`` prefix.
    """

    def __init__(self, unet, text_encoder, shapes, text_encoder_note=""):
        self.unet = dict(unet)
        self.text_encoder = dict(text_encoder)
        self.shapes = dict(shapes)
        self.text_encoder_note = text_encoder_note  # why the text encoder table is empty, if it is
        self.kohya = {}
        for prefix, table in ((KOHYA_UNET, self.unet), (KOHYA_TEXT, self.text_encoder)):
            for path, target in table.items():
                self._add_kohya(prefix + path.replace(".", "_"), target)
        for target in self.unet.values():  # our own names, as kohya would spell them
            self._add_kohya(KOHYA_UNET + target.param[len(UNET_PREFIX):-len(".weight")].replace(".", "_"), target)

    def _add_kohya(self, name, target):
        if self.kohya.get(name, target) != target:
            raise AssertionError(f"two modules share the kohya name {name}")  # a bug in the tables, not input
        self.kohya[name] = target

    @classmethod
    def for_model(cls, model):
        """The names of a built ``LatentDiffusion`` (any device, meta included): the U-Net table from
        its U-Net's config, checked against its weights; the text-encoder table from the weights of
        ``cond_stage_model`` (empty when it has none of a known layout)."""
        shapes = {key: tuple(p.shape) for key, p in model.named_parameters()}
        unet = getattr(getattr(model, "model", None), "diffusion_model", None)
        if unet is None:
            raise UserError(f"LoRA needs a latent diffusion model with a U-Net at model.diffusion_model; "
                            f"got a {type(model).__name__}")
        if not any(hasattr(m, "transformer_blocks") for m in unet.modules()):
            raise UserError("LoRA needs a U-Net with spatial transformers (use_spatial_transformer: True), "
                            "the Stable Diffusion U-Net that LoRA files name")
        unet_targets = {path: Target("unet", f"{UNET_PREFIX}{ours}.weight")
                        for path, ours in unet_module_names(UNetLayout.from_unet(unet)).items()}
        absent = [f"{path} -> {t.param}" for path, t in unet_targets.items() if t.param not in shapes]
        if absent:
            raise UserError(f"this U-Net does not have the Stable Diffusion block layout LoRA files name "
                            f"({len(absent)} layers missing, e.g. {absent[0]}); LoRA cannot be applied to it")
        text_shapes = {key[len(TEXT_PREFIX):]: shape for key, shape in shapes.items() if key.startswith(TEXT_PREFIX)}
        text_targets = text_encoder_targets(text_shapes)
        note = ""
        if not text_targets:
            kind = type(getattr(model, "cond_stage_model", None)).__name__
            note = f"this model's text encoder ({kind}) has no layer layout LoRA files name"
        return cls(unet_targets, text_targets, shapes, note)

    def resolve(self, module):
        """The :class:`Target` of a file's module name, or None when it names no layer of this model."""
        if module.startswith((KOHYA_UNET, KOHYA_TEXT)):
            return self.kohya.get(module)
        for prefix, tables in (("unet.", (self.unet,)), ("text_encoder.", (self.text_encoder,)),
                               ("base_model.model.", (self.unet, self.text_encoder)),
                               ("", (self.unet, self.text_encoder))):
            if module.startswith(prefix):
                path = module[len(prefix):]
                for table in tables:
                    if path in table:
                        return table[path]
                return None
        return None

    def shape(self, target):
        """The shape of the weight (or block of rows) ``target`` changes."""
        shape = self.shapes[target.param]
        if target.rows is None:
            return shape
        return (target.rows[1] - target.rows[0],) + tuple(shape[1:])
