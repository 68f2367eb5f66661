"""A small stand-in denoiser for the calibration and fine-tuning tests: DiT-shaped (tokens, adaLN-style
conditioning, blocks.N.* linears, a final linear) and a few-step DDIM trajectory, small enough for CPU tests."""
import math

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """The facebookresearch DiT block layout (adaLN-modulated attention and MLP, gated residuals)."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.attn = Attention(d, heads)
        self.mlp = Mlp(d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, h, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        ln = lambda z: torch.nn.functional.layer_norm(z, z.shape[-1:])  # noqa: E731
        h = h + g1[:, None] * self.attn(modulate(ln(h), sh1, sc1))
        return h + g2[:, None] * self.mlp(modulate(ln(h), sh2, sc2))


class TinyDenoiser(nn.Module):
    """ε(x (B, C, S, S), t (B,), y (B,)) with patch size 2."""

    def __init__(self, c=1, s=8, d=24, depth=2, classes=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c, self.s, self.d = c, s, d
        self.embed_x = nn.Linear(4 * c, d)
        self.embed_t = nn.Linear(16, d)
        self.embed_y = nn.Embedding(classes, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 4 * c)
        for p in self.parameters():  # deterministic, with a few outlier input channels like real activations
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        with torch.no_grad():
            for blk in self.blocks:  # outlier input channels, as trained DiTs have
                blk.adaLN_modulation[1].weight[:3] *= 8.0
                blk.adaLN_modulation[1].bias[:3] += 3.0
                blk.adaLN_modulation[1].weight[3 * d:3 * d + 2] *= 8.0

    # the DiT interface calibration walks: embed -> blocks[i](h, c) -> final
    def embed(self, x, t, y):
        b, c, s, _ = x.shape
        tok = x.reshape(b, c, s // 2, 2, s // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (s // 2) ** 2, 4 * c)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        temb = torch.cat([torch.sin(t[:, None].float() * freqs), torch.cos(t[:, None].float() * freqs)], -1)
        return self.embed_x(tok), self.embed_t(temb) + self.embed_y(y)

    def final(self, h, c):
        b, g = h.shape[0], self.s // 2
        return self.head(h).reshape(b, g, g, self.c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, self.c, self.s, self.s)

    def forward(self, x, t, y):
        h, cond = self.embed(x, t, y)
        for blk in self.blocks:
            h = blk(h, cond)
        return self.final(h, cond)


class Wrapped(nn.Module):
    """The same network without the staged interface: calibration then walks it as one stage."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.c, self.s = inner.c, inner.s

    def forward(self, x, t, y):
        return self.inner(x, t, y)


def alphas_bar(T=100):
    betas = torch.linspace(1e-4, 0.05, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@torch.no_grad()
def ddim_trajectory(model, n=4, steps=5, seed=0, classes=4, T=100):
    """The (x_t, t, y) inputs the model sees along a deterministic DDIM run."""
    g = torch.Generator().manual_seed(seed)
    ab = alphas_bar(T)
    ts = torch.linspace(T - 1, 0, steps).round().long()
    x = torch.randn(n, model.c, model.s, model.s, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    out = []
    for i, t in enumerate(ts):
        tt = torch.full((n,), int(t))
        out.append((x.clone(), tt, y.clone()))
        eps = model(x, tt, y)
        a, a_prev = float(ab[t]), float(ab[ts[i + 1]]) if i + 1 < steps else 1.0
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return out
