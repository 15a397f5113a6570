"""Freezing a sub-model: the one way models, encoders and losses keep a part fixed.

A frozen module is in eval mode, has no trainable parameters, and stays in eval mode when its
parent is switched to training (Lightning calls ``model.train()`` at the start of every epoch,
which would otherwise turn dropout back on inside a frozen VAE or text encoder).
"""
import functools


def disabled_train(self, mode=True):
    """Replacement for ``Module.train`` on a frozen module: a no-op, so it stays in eval mode."""
    return self


def freeze_module(module):
    """Eval mode for good and ``requires_grad = False`` for all parameters; returns ``module``."""
    module.eval()
    # a partial rather than a bound method, so that the module still pickles (torch.save(model),
    # spawn-started processes): a bound method pickles by a name the module does not have
    module.train = functools.partial(disabled_train, module)
    for param in module.parameters():
        param.requires_grad = False
    return module
