"""Fused DiT blocks for packed inference: LayerNorm + adaLN modulate + quantization in one kernel.

In a DiT block the inputs of ``attn.qkv`` and ``mlp.fc1`` are ``modulate(LayerNorm(x), shift, scale)``; a
row-owning quantization kernel can read ``x`` once and do all three (research/kernels.md §5.3). ``fc1``'s
epilogue also applies GELU and, where ``fc2`` carries no branch (whose first stage needs the unquantized row),
quantizes straight into ``fc2``'s activation format. ``proj``'s and ``fc2``'s epilogues add the gated residual
(``x + gate ⊙ y``) as they store, where those layers are packed with quantized activations: that saves a multiply
and an add pass over the (tokens × hidden) activations per residual, two per block.

    h1 = x + gate_msa · proj(attention(qkv(Q(mod(LN(x), shift_msa, scale_msa)))))
    y  = h1 + gate_mlp · fc2(Q(GELU(fc1(Q(mod(LN(h1), shift_mlp, scale_mlp))))))

The fused residual rounds once less than the unfused ``x + gate·y`` (the product stays float32, see
``kernels.packed_linear``), so the two agree to bf16 rounding, not bit for bit.

:func:`fuse_dit_blocks` swaps every ``DiTBlock`` whose ``qkv`` and ``fc1`` are packed for a
:class:`FusedDiTBlock` holding the same submodules (the state dict is unchanged).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import QuantizedActivation
from .linear import TreeQLinear


def _quantized(mod: nn.Module) -> bool:
    return isinstance(mod, TreeQLinear) and mod.act_spec.is_quantized


class FusedDiTBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
            setattr(self, name, getattr(block, name))
        if not (_quantized(self.attn.qkv) and _quantized(self.mlp.fc1)):
            raise ValueError("FusedDiTBlock needs packed qkv and fc1 with quantized activations")
        self.eps1, self.eps2 = self.norm1.eps, self.norm2.eps
        fc2 = self.mlp.fc2   # fc1's epilogue quantizes for fc2 directly unless fc2's branch needs the float row
        self.fc2_from_epilogue = _quantized(fc2) and fc2.monarch_w1 is None
        # the gated residual rides on the epilogue of a packed layer with quantized activations; any other proj /
        # fc2 (16-bit, weight-only) keeps the separate multiply and add (so does a block with these set False:
        # bench_e2e's A/B of the fusion)
        self.proj_residual, self.fc2_residual = _quantized(self.attn.proj), _quantized(fc2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        mod = self.adaLN_modulation(c)
        _, _, gate_msa, _, _, gate_mlp = mod.chunk(6, dim=1)  # the gates stay in the activations' dtype
        # the quantization kernels take shift and scale as contiguous float32 (G, K): one conversion for all four
        # here, instead of one small kernel per tensor per call
        # (the gates too, which the fused residual takes as float32: the same values as the bf16 ones)
        m32 = mod.view(n, 6, d).transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        m32 = m32.contiguous()   # a float32 model's .to() above is a no-op view
        shift_msa, scale_msa, shift_mlp, scale_mlp = m32[0], m32[1], m32[3], m32[4]
        attn = self.attn
        x2 = x.reshape(n * t, d).contiguous()
        act = attn.qkv.quantize_input(x2, ln_eps=self.eps1, shift=shift_msa, scale=scale_msa)
        qkv = attn.qkv.linear(act, out_dtype=x.dtype).reshape(n, t, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * t, d)
        if self.proj_residual:
            x2 = attn.proj.linear(attn.proj.quantize_input(o.contiguous()), out_dtype=x.dtype, residual=x2,
                                  gate=m32[2])
        else:
            x2 = (x + gate_msa.unsqueeze(1) * attn.proj(o).reshape(n, t, d)).reshape(n * t, d)

        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        act = fc1.quantize_input(x2, ln_eps=self.eps2, shift=shift_mlp, scale=scale_mlp)
        if self.fc2_from_epilogue:
            h = fc1.linear(act, gelu=True, out_spec=fc2.act_spec, out_dtype=x.dtype)
        else:
            h = fc1.linear(act, gelu=True, out_dtype=x.dtype)
            if self.fc2_residual:   # fc2's branch reads the float rows: quantize them with it
                h = fc2.quantize_input(h)
        if self.fc2_residual:
            return fc2.linear(h, out_dtype=x.dtype, residual=x2, gate=m32[5]).reshape(n, t, d)
        y = fc2.linear(h, out_dtype=x.dtype) if isinstance(h, QuantizedActivation) else fc2(h)
        return x2.reshape(n, t, d) + gate_mlp.unsqueeze(1) * y.reshape(n, t, d)


def fuse_dit_blocks(model: nn.Module) -> int:
    """Swap eligible blocks of a (packed) DiT for :class:`FusedDiTBlock`; returns how many were fused."""
    from ..models.dit import DiTBlock

    fused = 0
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return 0
    for i, blk in enumerate(blocks):
        if isinstance(blk, DiTBlock) and _quantized(blk.attn.qkv) and _quantized(blk.mlp.fc1):
            blocks[i] = FusedDiTBlock(blk)
            fused += 1
    return fused
