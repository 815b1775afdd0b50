"""A PyTorch model of the OpenAI CLIP ViT architecture, written for the interop tests from the
paper's description (Radford et al. 2021) -- an independent reference for the converted models.

Image: bias-free patch conv, class token + learned positions (class token included), LayerNorm,
pre-norm residual attention blocks (``torch.nn.MultiheadAttention``, fused in-projection), a
LayerNorm on the class token, a bias-free projection. Text: token + position embeddings, the
same blocks under a causal mask, a final LayerNorm, the state at the end-of-text token (the
largest id, as OpenAI's ``argmax``), a bias-free projection.

``TextTower`` groups the text parameters so that :class:`CustomTextClip` has open_clip's
``CustomTextCLIP`` key layout (``text.*``); :class:`Clip` has OpenAI's (text at the top level).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=act(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x, mask=None):  # x [L, B, W] (sequence first)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp, act):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, mlp, act) for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Visual(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, mlp, embed_dim, act):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim))

    def forward(self, x):  # x [B, 3, H, W], normalized
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class TextTower(nn.Module):
    def __init__(self, vocab, context, width, layers, heads, mlp, embed_dim, act):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width))
        self.transformer = Transformer(width, layers, heads, mlp, act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim))

    def forward(self, tokens):  # [B, L] int64
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf")).triu(1)
        x = self.ln_final(self.transformer(x.transpose(0, 1), mask).transpose(0, 1))
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


def _randomize(module: nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm scales near 1), so no tensor can be mapped wrongly unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale") or name.endswith("logit_bias"):
                continue
            scale = 1.0 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "ln" in name and name.endswith("weight") else 0.0))


class Clip(nn.Module):
    """OpenAI layout: ``visual.*``, text tower at the top level, ``logit_scale``."""

    def __init__(self, *, image_size=32, patch=8, vision_width=128, vision_layers=2, vision_heads=2,
                 vocab=600, context=12, text_width=64, text_layers=2, text_heads=4, embed_dim=48,
                 act=QuickGELU, seed=0):
        super().__init__()
        self.visual = Visual(image_size, patch, vision_width, vision_layers, vision_heads, 4 * vision_width,
                             embed_dim, act)
        text = TextTower(vocab, context, text_width, text_layers, text_heads, 4 * text_width, embed_dim, act)
        self._text_modules(text)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))
        _randomize(self, seed)

    def _text_modules(self, text):
        self.token_embedding, self.positional_embedding = text.token_embedding, text.positional_embedding
        self.transformer, self.ln_final, self.text_projection = text.transformer, text.ln_final, text.text_projection

    def encode_image(self, images):
        return nn.functional.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens):
        return nn.functional.normalize(TextTower.forward(self, tokens), dim=-1)


class CustomTextClip(nn.Module):
    """open_clip's CustomTextCLIP layout: ``visual.*``, ``text.*``, ``logit_scale``, ``logit_bias``."""

    def __init__(self, *, image_size=32, patch=8, vision_width=128, vision_layers=2, vision_heads=2,
                 vocab=600, context=12, text_width=64, text_layers=2, text_heads=4, embed_dim=48,
                 act=nn.GELU, seed=1):
        super().__init__()
        self.visual = Visual(image_size, patch, vision_width, vision_layers, vision_heads, 4 * vision_width,
                             embed_dim, act)
        self.text = TextTower(vocab, context, text_width, text_layers, text_heads, 4 * text_width, embed_dim, act)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-7.5))
        _randomize(self, seed)

    def encode_image(self, images):
        return nn.functional.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens):
        return nn.functional.normalize(self.text(tokens), dim=-1)
