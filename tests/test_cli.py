"""Model-aware defaults and the attention options the scripts derive from flags and environment."""
from types import SimpleNamespace

from ldm.cli import OFFICIAL_DEFAULTS, SHIPPED_DEFAULTS, attention_options, fill_model_defaults


def test_shipped_model_defaults_apply_only_without_ckpt():
    args = SimpleNamespace(ckpt=None, config=None, prompt=None, steps=None, scale=None, from_file=None)
    fill_model_defaults(args)
    assert (args.prompt, args.steps, args.scale) == tuple(SHIPPED_DEFAULTS[k] for k in ("prompt", "steps", "scale"))
    args = SimpleNamespace(ckpt="sd.ckpt", config="v1.yaml", prompt=None, steps=7, scale=None, from_file="p.txt")
    fill_model_defaults(args)
    assert args.steps == 7 and args.scale == OFFICIAL_DEFAULTS["scale"] and args.prompt is None


def test_attention_precision_follows_attn_precision():
    args = SimpleNamespace(attention="sdpa")
    assert attention_options(args, environ={}) == ("sdpa", True)
    assert attention_options(args, environ={"ATTN_PRECISION": "fp16"}) == ("sdpa", False)
    # without CUDA, auto never picks xformers
    assert attention_options(SimpleNamespace(attention="auto"), environ={})[0] == "sdpa"
