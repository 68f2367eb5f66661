"""The Diffusion Transformer (DiT, Peebles & Xie 2023) in the facebookresearch layout, written for this project.

Module and state-dict names follow the reference implementation exactly, so an official checkpoint loads:

    x_embedder.proj                      Conv2d(C, D, p, stride p)           patches -> tokens
    pos_embed                            (1, T, D) fixed 2-D sin-cos         a Parameter (saved, not trained)
    t_embedder.mlp.{0,2}                 Linear(256, D), SiLU, Linear(D, D)  sinusoidal timestep features
    y_embedder.embedding_table           Embedding(classes + 1, D)           the last row is the CFG null class
    blocks.N.norm1 / norm2               LayerNorm(D, no affine, eps 1e-6)
    blocks.N.attn.{qkv, proj}            Linear(D, 3D), Linear(D, D)
    blocks.N.mlp.{fc1, fc2}              Linear(D, 4D), GELU(tanh), Linear(4D, D)
    blocks.N.adaLN_modulation.1          Linear(D, 6D) after SiLU            shift/scale/gate for attn and mlp
    final_layer.adaLN_modulation.1       Linear(D, 2D) after SiLU
    final_layer.linear                   Linear(D, p²·C_out)

The forward pass is split so that a search can run any suffix of the network from cached inputs:

    h, c = model.embed(x, t, y)          # h (N, T, D) tokens, c (N, D) conditioning
    for block in model.blocks:
        h = block(h, c)
    out = model.final(h, c)              # (N, C_out, H, W)

``forward`` is exactly that composition; ``forward_with_cfg`` adds classifier-free guidance as the reference
does. Configurations are frozen :class:`DiTConfig` values; ``DIT_CONFIGS`` names the reference family
DiT-{S,B,L,XL}/{2,4,8} plus small test configs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Shape of a DiT. ``input_size`` is the spatial side of the model's input (latent side for latent DiTs).

    ``cfg_channels`` is how many leading output channels classifier-free guidance mixes. ``None`` means the
    reference behaviour: 3 when ``in_channels == 4`` (the official models guide only 3 of the 4 latent eps
    channels "for exact reproducibility"), otherwise exactly the ``in_channels`` eps channels, so that a
    1-channel model with a learned variance never guides its variance channel.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    cfg_channels: int | None = None

    def __post_init__(self) -> None:
        for f in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DiTConfig.{f} must be a positive int, got {v!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig: input_size {self.input_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig: hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos "
                             "position embedding)")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or \
                not math.isfinite(self.mlp_ratio) or int(self.hidden_size * self.mlp_ratio) <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be a positive number (the MLP's width over hidden_size), "
                             f"got {self.mlp_ratio!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.cfg_channels is not None and not 0 < self.cfg_channels <= self.out_channels:
            raise ValueError(f"DiTConfig.cfg_channels must be in [1, {self.out_channels}], got {self.cfg_channels}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def guided_channels(self) -> int:
        if self.cfg_channels is not None:
            return self.cfg_channels
        return 3 if self.in_channels == 4 else self.in_channels

    def replace(self, **changes: Any) -> "DiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DiTConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)


_FAMILY = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DIT_CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{p}": DiTConfig(depth=d, hidden_size=h, num_heads=nh, patch_size=p)
    for size, (d, h, nh) in _FAMILY.items() for p in (2, 4, 8)
}
# Small configs for tests and CPU experiments (same structure, random weights).
DIT_CONFIGS.update({
    "DiT-test": DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10),
    "DiT-test-1ch": DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                              num_classes=10),
})


def dit_config(name: str, **overrides: Any) -> DiTConfig:
    """A named config (``"DiT-XL/2"``, ``"DiT-test"``...) with optional field overrides."""
    if name not in DIT_CONFIGS:
        raise KeyError(f"unknown DiT config {name!r}; known: {sorted(DIT_CONFIGS)}")
    return DIT_CONFIGS[name].replace(**overrides) if overrides else DIT_CONFIGS[name]


# -- fixed embeddings ------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps ``t (N,)`` -> ``(N, dim)``: ``[cos | sin]`` of
    ``t · max_period^(−i/half)`` for ``i < half`` (odd ``dim`` gets a zero column)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``(M,)`` positions -> ``(M, dim)``: ``[sin | cos]`` of ``pos · 10000^(−i/(dim/2))`` (float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D position table ``(grid², dim)`` of MAE/DiT. Token ``i·grid + j`` (row i, column j) gets the
    1-D embedding of its column j in the first half and of its row i in the second half (the reference builds
    the grid with ``meshgrid(w, h)``, so its "h" half actually holds the column index)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x (N, T, D) · (1 + scale (N, D)) + shift (N, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# -- modules ---------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """``(N, C, H, W)`` -> ``(N, T, D)`` with a stride-p convolution ``proj`` (the reference's timm PatchEmbed)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"DiT input must be (N, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"DiT input must be a float tensor, got {x.dtype}")
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timesteps ``(N,)`` -> ``(N, D)``: 256 sinusoidal features through ``mlp = [Linear, SiLU, Linear]``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bool or t.is_complex():   # (values are not read: that would stall a GPU every step)
            raise TypeError(f"timesteps must be integer or real, got {t.dtype}")
        first = self.mlp[0]  # an nn.Linear, or a quantized stand-in (a packed layer's `weight` is dequantized)
        dtype = getattr(first, "out_dtype", None) or first.weight.dtype
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class LabelEmbedder(nn.Module):
    """Class labels ``(N,)`` -> ``(N, D)``. With ``dropout_prob > 0`` the table has one extra row, the null
    class ``num_classes`` used for classifier-free guidance; in training, labels are replaced by it with that
    probability (or where ``force_drop_ids == 1``)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"class labels must be an int64/int32 tensor, got {labels.dtype}")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        n = self.embedding_table.num_embeddings
        # Checked on CPU only: on a GPU the check would cost a host sync per forward (and not while torch.compile
        # traces: its graph has no Python branch on values).
        if (labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel()
                and (int(labels.min()) < 0 or int(labels.max()) >= n)):
            raise ValueError(f"class labels must be in [0, {n - 1}] (the last is the null class), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj`` (timm's layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # qkv features are laid out (3, heads, head_dim), as the reference's reshape expects.
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√head_dim)·v
        return self.proj(o.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``h (N, T, D), c (N, D) -> h (N, T, D)``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and ``linear``: ``(N, T, D) -> (N, T, p²·C_out)``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT: ``forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C_out, H, W)``, where ``C_out`` is
    ``2C`` with a learned variance (eps channels first, then the variance interpolation values)."""

    def __init__(self, config: DiTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = DiTConfig(**kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.learn_sigma = config.learn_sigma
        self.num_classes = config.num_classes
        d = config.hidden_size

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """The label that selects the unconditional embedding (needs ``class_dropout_prob > 0``)."""
        if self.config.class_dropout_prob <= 0:
            raise ValueError("this DiT has no null class (class_dropout_prob == 0): it cannot do guidance")
        return self.num_classes

    def initialize_weights(self) -> None:
        """The reference initialisation: Xavier-uniform linears (and patch conv as a linear), zero biases,
        N(0, 0.02) label table and timestep MLP, zeroed adaLN and output layers (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = int(round(math.sqrt(self.config.num_tokens)))
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    # -- the decomposed forward ------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              force_drop_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, C, H, W), t (N,), y (N,)`` -> tokens ``h (N, T, D)`` and conditioning ``c (N, D)``."""
        n = x.shape[0]
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"DiT: t and y must be ({n},) for x of shape {tuple(x.shape)}, got t "
                             f"{tuple(t.shape)} and y {tuple(y.shape)}")
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return h, c

    def final(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``h (N, T, D)`` -> output image ``(N, C_out, H, W)``."""
        return self.unpatchify(self.final_layer(h, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, p²·C_out)`` -> ``(N, C_out, H, W)``; token features are laid out (p, p, C_out)."""
        c, p = self.out_channels, self.patch_size
        g = int(round(math.sqrt(x.shape[1])))
        if g * g != x.shape[1]:
            raise ValueError(f"unpatchify: {x.shape[1]} tokens do not form a square grid")
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        h, c = self.embed(x, t, y, force_drop_ids)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance, batched as the reference does: the batch is ``[cond; uncond]`` (second
        half labelled with the null class), only the first half of ``x`` is used, and both halves of the
        result carry ``uncond + cfg_scale·(cond − uncond)`` on the first ``guided_channels`` output channels
        (default ``config.guided_channels``); the remaining channels pass through unguided."""
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
        g = self.config.guided_channels if guided_channels is None else guided_channels
        if not 0 < g <= self.out_channels:
            raise ValueError(f"guided_channels must be in [1, {self.out_channels}], got {g}")
        half = x[: x.shape[0] // 2]
        out = self(torch.cat([half, half], dim=0), t, y)  # through __call__, so module hooks see it
        eps, rest = out[:, :g], out[:, g:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)
