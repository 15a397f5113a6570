"""Config instantiation and small helpers shared across the package."""
import importlib
import inspect

import torch

from ldm.config_safety import building_untrusted, check_target, check_target_name, is_trusted
from ldm.errors import UserError


def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if inspect.isfunction(d) else d


def mean_flat(tensor):
    """Mean over every dimension but the batch one."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def count_params(model, verbose=False):
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total


def get_obj_from_str(string, reload=False):
    module, cls = string.rsplit(".", 1)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise UserError(f"config target '{string}': cannot import module '{module}' ({err})") from None
    if reload:
        mod = importlib.reload(mod)
    try:
        return getattr(mod, cls)
    except AttributeError:
        raise UserError(f"config target '{string}': module '{module}' has no '{cls}'") from None


def instantiate_from_config(config, **extra):
    """Build ``target(**params)`` from a ``target``/``params`` mapping (OmegaConf or dict).

    Unless inside ``ldm.config_safety.trusting_configs()``, only targets of the trusted modules
    are imported and built (see ldm.config_safety); anything else is an UntrustedConfigError.
    """
    if "target" not in config:
        if config == "__is_first_stage__" or config == "__is_unconditional__":
            return None
        raise UserError(f"config has no 'target' key (keys: {list(config.keys())})")
    target = config["target"]
    trusted = is_trusted()
    if not trusted:
        check_target_name(target)
    cls = get_obj_from_str(target)
    if not trusted:
        check_target(target, cls)
    params = dict(config.get("params", dict()) or dict())
    params.update(extra)
    try:
        with building_untrusted():
            return cls(**params)
    except TypeError as err:
        # Only the constructor's own signature mismatch is a config error; a TypeError from deeper
        # inside is a bug and keeps its traceback.
        if "unexpected keyword argument" in str(err) or "missing" in str(err) and "required" in str(err):
            raise UserError(f"config target '{target}': {err}") from None
        raise


def isimage(x):
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)
