"""Class-label conditioning with label dropout for classifier-free guidance."""
import torch
import torch.nn as nn


class ClassEmbedder(nn.Module):
    """``batch[key]`` (LongTensor[B]) -> ``[B, 1, embed_dim]``, shaped as a one-token cross-attention context.

    The last class id doubles as the "no class" label: during training each label is replaced by it with
    probability ``ucg_rate``, and ``get_unconditional_conditioning`` asks for it.
    """

    def __init__(self, embed_dim, n_classes=1000, key='class', ucg_rate=0.1):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.n_classes = n_classes
        self.ucg_rate = ucg_rate

    def forward(self, batch, key=None, disable_dropout=False):
        labels = batch[key or self.key][:, None]  # [B, 1]
        if self.ucg_rate > 0. and not disable_dropout:
            drop = torch.bernoulli(torch.full(labels.shape, self.ucg_rate, device=labels.device)).bool()
            labels = torch.where(drop, torch.full_like(labels, self.n_classes - 1), labels)
        return self.embedding(labels.long())

    def get_unconditional_conditioning(self, bs, device=None):
        device = self.embedding.weight.device if device is None else device
        return {self.key: torch.full((bs,), self.n_classes - 1, device=device, dtype=torch.long)}
