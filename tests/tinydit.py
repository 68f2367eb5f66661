"""A tiny DiT-shaped stand-in for the search tests: the facebookresearch block structure and module names
(``blocks.N.{adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}``, ``t_embedder.mlp.{0,2}``,
``final_layer.{linear, adaLN_modulation.1}``) and the decomposed forward the search runs
(``embed(x, t, y) -> (h, c)``, ``blocks[i](h, c)``, ``final(h, c)``), on token inputs ``x (B, T, C)``."""
import math

import torch
import torch.nn as nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, 2 * d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        sm, cm, gm, sp, cp, gp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), sm, cm))
        return x + gp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sp, cp))


class TimestepEmbedder(nn.Module):
    def __init__(self, d, freq=16):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        half = self.freq // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        a = t.float()[:, None] * f[None]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], dim=-1))


class XEmbedder(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.proj = nn.Linear(c, d)

    def forward(self, x):
        return self.proj(x)


class YEmbedder(nn.Module):
    def __init__(self, classes, d):
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, d)

    def forward(self, y):
        return self.embedding_table(y)


class FinalLayer(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, c)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TinyDiT(nn.Module):
    def __init__(self, depth=3, d=32, heads=2, c=4, tokens=8, classes=5, seed=0):
        super().__init__()
        self.in_channels, self.tokens, self.classes = c, tokens, classes
        self.x_embedder = XEmbedder(c, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = YEmbedder(classes, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(d, 2 * c)   # learned-σ style output: ε and a variance part
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
            for b in self.blocks:   # heavier-tailed weights, as trained transformers have
                b.mlp.fc1.weight.mul_(1 + 3 * (torch.rand(b.mlp.fc1.weight.shape, generator=g) > 0.97))

    def embed(self, x, t, y):
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)

    def final(self, h, c):
        return self.final_layer(h, c)

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)
        for b in self.blocks:
            h = b(h, c)
        return self.final(h, c)


def calibration(model, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.tokens, model.in_channels, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, model.classes, (n,), generator=g)
    return x, t, y


def setup(depth, d, tokens, seed, n):
    """A stand-in model, ``n`` calibration inputs and its search space."""
    from treeq_engine.search import SearchSpace

    model = TinyDiT(depth=depth, d=d, tokens=tokens, seed=seed)
    inputs = calibration(model, n=n, seed=seed + 1)
    return model, inputs, SearchSpace.build(model, [t[:2] for t in inputs])


def eps(out):
    """The ε half of the output: what the search's metric sees."""
    return out[..., : out.shape[-1] // 2]


def assert_scores_close(got, want, rtol: float = 1e-5) -> None:
    """Scores of the same plans computed two ways (candidates stacked, another batch split, a brute-force forward)
    agree to float rounding, except where an ulp of difference puts a value on the other side of a quantizer's
    rounding boundary: a code moves by one step and that score by a fraction of a percent (seen on some CPUs, not
    on others). So: every score within 1 %, and three in four within ``rtol``; a wrong config or a wrong layer
    moves scores far more, and all of them."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    assert (rel < 1e-2).all(), f"scores differ by up to {rel.max():.2e}: {got} vs {want}"
    assert (rel < rtol).mean() >= 0.75, f"{(rel >= rtol).sum()} of {rel.size} scores differ by more than {rtol}"


import pytest  # noqa: E402


@pytest.fixture(autouse=False)
def one_thread():
    """The search tests run many tiny ops: one intra-op thread is as fast and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
