"""A small text encoder trained from scratch together with a small diffusion model."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.modules.encoders.prompt_encoder import ChunkedTextEncoder
from ldm.modules.encoders.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, CLIPBPETokenizer


class SelfAttention(nn.Module):
    def __init__(self, n_embed, n_head, causal, token_local=False):
        super().__init__()
        if n_embed % n_head:
            raise UserError(f"n_embed={n_embed} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.causal = causal
        self.token_local = token_local
        self.qkv = nn.Linear(n_embed, 3 * n_embed)
        self.proj = nn.Linear(n_embed, n_embed)

    def forward(self, x):
        b, length, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x [B, L, D]
        q, k, v = (t.view(b, length, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D/H]
        if self.token_local:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self_and_start_mask(length, x.device))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, H, L, D/H]
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


def self_and_start_mask(length, device):
    """[L, L] boolean mask letting each token attend to itself and the start token only."""
    mask = torch.eye(length, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return mask


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embed, n_head, causal, token_local=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embed)
        self.attn = SelfAttention(n_embed, n_head, causal, token_local)
        self.ln_2 = nn.LayerNorm(n_embed)
        self.mlp = nn.Sequential(nn.Linear(n_embed, 4 * n_embed), nn.GELU(), nn.Linear(4 * n_embed, n_embed))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPTokenTransformerEmbedder(ChunkedTextEncoder):
    """Trainable prompts -> ``[B, max_length * chunks, n_embed]`` encoder over CLIP BPE tokens (padded with 49407).

    Token + learned positional embedding, ``n_layer`` pre-LN blocks, final LayerNorm. Attention is
    bidirectional by default: with no pretrained CLIP to stay compatible with, letting every token see the
    whole prompt (an adjective sees its noun) is the better use of two small layers, and the fixed pad
    tokens become extra learned context slots for cross-attention. ``causal=True`` gives CLIP-style masking.
    ``token_local=True`` lets each token see only itself and the start token: a word's output then depends
    on the word and its position, never on its neighbours, so a colour never seen with a shape still
    reaches the U-Net as the two familiar vectors (composition is left to cross-attention).

    ``emphasis``, ``truncate`` and ``clip_skip`` are the prompt options of ``ChunkedTextEncoder``; clip skip N
    runs all but the last N - 1 blocks, then the final LayerNorm, as for the OpenCLIP encoder.
    """

    def __init__(self, n_embed=128, n_layer=2, n_head=4, max_length=77, vocab_size=VOCAB_SIZE, causal=False,
                 token_local=False, emphasis="none", clip_skip=1, truncate=True):
        super().__init__()
        if causal and token_local:
            raise UserError("causal and token_local are two different attention masks: set one of them")
        if vocab_size < VOCAB_SIZE:
            raise UserError(f"vocab_size={vocab_size} is smaller than the CLIP BPE vocabulary ({VOCAB_SIZE})")
        self.tokenizer = CLIPBPETokenizer(max_length, pad_token_id=EOS_TOKEN_ID)
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, n_embed)
        self.positional_embedding = nn.Parameter(torch.empty(max_length, n_embed))
        self.blocks = nn.ModuleList(Block(n_embed, n_head, causal, token_local) for _ in range(n_layer))
        self.ln_final = nn.LayerNorm(n_embed)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.init_prompt_options(emphasis, clip_skip, truncate)

    def check_clip_skip(self, clip_skip):
        if clip_skip > len(self.blocks):
            raise UserError(f"clip_skip={clip_skip} leaves none of this text encoder's {len(self.blocks)} blocks "
                            f"to run")

    def token_embedding_layer(self):
        return self.token_embedding

    def encode_tokens(self, tokens, clip_skip):
        x = self.token_embedding(tokens) + self.positional_embedding  # [B, L, D]
        for block in self.blocks[:len(self.blocks) - (clip_skip - 1)]:
            x = block(x)
        return self.ln_final(x)
