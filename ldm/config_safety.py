"""Which config ``target``s may be built without the user's say-so.

A ``target: a.b.C`` in a YAML config is imported and called, so a config from the internet could
name ``os.system``. Unless the caller trusts the config, only targets defined in the modules
below are built: this project and the few classes of its dependencies that the official configs
and ours name. Everything else needs ``trust_config=True`` (the library's argument; command
lines spell it ``--trust-config``).

Two checks, so that no path gets around them: :func:`check_config_targets` reads a whole config
tree before anything is imported or built, and :func:`check_target` runs inside
``instantiate_from_config`` for every object, including the sub-models that model constructors
build from nested configs (``unet_config``, ``first_stage_config``, ...).
"""
import contextvars
import inspect
from contextlib import contextmanager

from ldm.errors import UserError

# Module prefixes whose classes and functions a config may name; kept short on purpose.
TRUSTED_MODULES = (
    "ldm.", "cldm.",                                               # this project, ControlNet's path
    "torch.nn.",                                                   # torch.nn.Identity (lossconfig)
    "pytorch_lightning.callbacks.", "pytorch_lightning.loggers.",  # main.py's callbacks, loggers
    "lightning.pytorch.callbacks.", "lightning.pytorch.loggers.",
)
# The official configs name main.ImageLogger and main.DataModuleFromConfig, which main.py
# re-exports from ldm: the path may start with main., the object must still come from ldm.
REEXPORTING_MODULES = ("main.",)
TRUSTED_SUMMARY = "ldm.*, cldm.*, torch.nn.*, Lightning callbacks and loggers"

TRUST_ADVICE = "pass trust_config=True if you trust this config"

_TRUSTED = "trusted"
_UNTRUSTED = "untrusted"
_BUILDING_UNTRUSTED = "building an untrusted config"
_trust = contextvars.ContextVar("ldm_config_trust", default=_UNTRUSTED)


class UntrustedConfigError(UserError):
    """A config names a target outside :data:`TRUSTED_MODULES`.

    The message ends in library terms (``trust_config=True``); a command line re-raises it with
    its own flag through :meth:`advise`.
    """

    def __init__(self, problem, advice=TRUST_ADVICE):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem

    def advise(self, advice):
        return UntrustedConfigError(self.problem, advice)


def is_trusted():
    return _trust.get() == _TRUSTED


@contextmanager
def trusting_configs(trust=True):
    """Inside this block every config target is built; with ``trust=False`` nothing changes.

    A target built from an untrusted config cannot open such a block (say, by calling a loader
    with ``trust_config=True``): that would let the config vouch for itself.
    """
    if not trust:
        yield
        return
    if _trust.get() == _BUILDING_UNTRUSTED:
        raise UntrustedConfigError("a target of this config asked to trust another config")
    token = _trust.set(_TRUSTED)
    try:
        yield
    finally:
        _trust.reset(token)


@contextmanager
def building_untrusted():
    """Marks the constructor call of a target from an untrusted config (see trusting_configs)."""
    if is_trusted():
        yield
        return
    token = _trust.set(_BUILDING_UNTRUSTED)
    try:
        yield
    finally:
        _trust.reset(token)


def _refusal(target, where, why):
    place = f" at {where}" if where else ""
    return UntrustedConfigError(
        f"config target '{target}'{place} {why}, so it was not built: a config that is not "
        f"trusted may only name classes and functions of {TRUSTED_SUMMARY}, since a target can "
        f"run any code")


def check_target_name(target, where=None):
    """Refuse a target whose dotted path is outside the trusted modules (nothing imported)."""
    if not isinstance(target, str) or not target.startswith(TRUSTED_MODULES + REEXPORTING_MODULES):
        raise _refusal(target, where, "is outside the trusted modules")


def check_target(target, obj):
    """Refuse a resolved target unless it is a class or function defined in a trusted module.

    The path alone is not enough: ``ldm.some_module.run`` is whatever that module imported under
    the name ``run``, possibly ``subprocess.run``.
    """
    check_target_name(target)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise _refusal(target, None, f"is a {type(obj).__name__}, not a class or function")
    module = getattr(obj, "__module__", None) or ""
    if not (module + ".").startswith(TRUSTED_MODULES):
        raise _refusal(target, None, f"is defined in '{module}', outside the trusted modules")


def check_config_targets(config, source=None):
    """Check every ``target`` in a config tree (dicts, lists, OmegaConf nodes) by name.

    ``source`` (a file name) only makes the message say where the config came from.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    if OmegaConf.is_config(config):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except OmegaConfBaseException as err:
            raise UserError(f"config{_from(source)} has an interpolation that cannot be resolved "
                            f"({str(err).splitlines()[0]})") from None
    for where, target in _targets(config, ""):
        check_target_name(target, f"{where or 'the top level'}{_from(source)}")


def _from(source):
    return f" of '{source}'" if source else ""


def _targets(node, where):
    """(key path, target) for every mapping with a ``target`` key."""
    if isinstance(node, dict):
        if "target" in node:
            yield where + ".target" if where else "target", node["target"]
        for key, value in node.items():
            yield from _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")
