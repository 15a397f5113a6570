"""Exponential moving average of a model's trainable parameters, stored as buffers.

Buffer names are the parameter names with the dots removed (``diffusion_model.out.2.weight`` ->
``diffusion_modelout2weight``), which is how ``model_ema.*`` keys appear in released checkpoints.
"""
import torch
from torch import nn


class LitEma(nn.Module):
    def __init__(self, model, decay=0.9999, use_num_upates=True):
        super().__init__()
        if decay < 0.0 or decay > 1.0:
            raise ValueError("decay must be between 0 and 1")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        # num_updates = -1 disables the warm-up of the decay.
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params = []

    def reset_num_updates(self):
        del self.num_updates
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))

    @torch.no_grad()
    def forward(self, model):
        decay = self.decay.item()
        if self.num_updates >= 0:
            self.num_updates += 1
            # Warm-up: early on the average follows the weights closely.
            decay = min(decay, (1 + self.num_updates.item()) / (10 + self.num_updates.item()))
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_(one_minus_decay * (s - param.to(s.dtype)))
            else:
                assert name not in self.m_name2s_name

    @torch.no_grad()
    def copy_to(self, model):
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data.copy_(shadow[self.m_name2s_name[name]].data)
            else:
                assert name not in self.m_name2s_name

    def store(self, parameters):
        """Keep a copy of ``parameters`` so ``restore`` can put them back after evaluating the EMA."""
        self.collected_params = [param.detach().clone() for param in parameters]

    def restore(self, parameters):
        for c_param, param in zip(self.collected_params, parameters):
            param.data.copy_(c_param.data)
        self.collected_params = []
