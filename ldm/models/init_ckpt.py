"""``ckpt_path`` in a model config: initial weights loaded while the model is built (training use).

The official classes each popped ``ckpt_path`` before calling ``super().__init__`` and loaded it
again at the end of their own constructor, so that the sub-models they add (the upscaler's
low-res stage, unCLIP's embedder, the depth estimator) exist before loading. Here that is one
step: a model class takes ``ckpt_path`` / ``ignore_keys`` / ``load_only_unet`` in its
constructor and records them with :meth:`InitFromCheckpoint.request_init_checkpoint`;
:meth:`~InitFromCheckpoint.load_init_checkpoint` then runs exactly once, after the most-derived
``__init__`` has returned. Subclasses need no loading code of their own.
"""
import functools
from dataclasses import dataclass
from typing import Optional

from ldm.errors import UserError

# Set in the instance __dict__ while its constructors run, so that only the outermost one loads.
_CONSTRUCTING = "_init_checkpoint_constructing"


@dataclass(frozen=True)
class InitCheckpoint:
    """What to load after construction: nothing while ``path`` is None."""
    path: Optional[str] = None
    ignore_keys: tuple = ()
    only_model: bool = False


def _load_after(init):
    """Wrap a class's ``__init__`` so that the checkpoint loads when the outermost constructor ends."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if self.__dict__.get(_CONSTRUCTING):  # called through super() from a subclass's __init__
            init(self, *args, **kwargs)
            return
        self.__dict__[_CONSTRUCTING] = True
        try:
            init(self, *args, **kwargs)
        finally:
            del self.__dict__[_CONSTRUCTING]
        self.load_init_checkpoint()
    return __init__


class InitFromCheckpoint:
    """Mixin for models that accept the official ``ckpt_path`` / ``ignore_keys`` parameters."""

    init_checkpoint = InitCheckpoint()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _load_after(cls.__dict__["__init__"])

    def request_init_checkpoint(self, ckpt_path=None, ignore_keys=(), only_model=False):
        """Record what :meth:`load_init_checkpoint` loads once every sub-model exists."""
        if isinstance(ignore_keys, str):
            ignore_keys = (ignore_keys,)
        self.init_checkpoint = InitCheckpoint(None if ckpt_path is None else str(ckpt_path),
                                              tuple(ignore_keys), bool(only_model))

    def load_init_checkpoint(self):
        """Load the requested checkpoint, if any; True when something was loaded. Runs once, after
        construction (a subclass that extends it calls ``super()``)."""
        spec = self.init_checkpoint
        if spec.path is None:
            return False
        self.init_from_ckpt(spec.path, ignore_keys=spec.ignore_keys, only_model=spec.only_model)
        return True

    def adapt_init_state_dict(self, sd):
        """Rewrite a checkpoint before :meth:`init_from_ckpt` loads it (fine-tuning widens input
        layers here); as it is by default."""
        return sd

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        """Non-strict load of ``path`` (official method): keys starting with any of ``ignore_keys``
        are skipped, ``only_model`` loads the denoiser ``self.model`` alone. Missing and unexpected
        keys are logged as warnings; a shape mismatch is an error (it would leave a layer at random).
        Returns the :class:`ldm.checkpoint.LoadReport`."""
        from ldm.checkpoint import load_state_dict_into, read_state_dict
        sd = self.adapt_init_state_dict(read_state_dict(path))
        report = load_state_dict_into(self, sd, strict=False, ignore_keys=ignore_keys, only_model=only_model)
        if report.mismatched:
            key, theirs, ours = report.mismatched[0]
            raise UserError(f"ckpt_path '{path}': {len(report.mismatched)} tensors do not fit "
                            f"{type(self).__name__} (e.g. {key}: checkpoint {list(theirs)} vs model "
                            f"{list(ours)}); use the checkpoint of this architecture or list the keys "
                            f"in ignore_keys")
        return report
