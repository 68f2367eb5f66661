"""Fused DiT blocks for packed inference: LayerNorm + adaLN modulate + quantization in one kernel.

In a DiT block the inputs of ``attn.qkv`` and ``mlp.fc1`` are ``modulate(LayerNorm(x), shift, scale)``; a
row-owning quantization kernel can read ``x`` once and do all three (docs/sources.md). ``fc1``'s
epilogue also applies GELU and, where ``fc2`` carries no branch (whose first stage needs the unquantized row),
quantizes straight into ``fc2``'s activation format. ``proj``'s and ``fc2``'s epilogues add the gated residual
(``x + gate ⊙ y``) as they store, where those layers are packed with quantized activations: that saves a multiply
and an add pass over the (tokens × hidden) activations per residual, two per block.

    h1 = x + gate_msa · proj(attention(qkv(Q(mod(LN(x), shift_msa, scale_msa)))))
    y  = h1 + gate_mlp · fc2(Q(GELU(fc1(Q(mod(LN(h1), shift_mlp, scale_mlp))))))

Where every block's ``adaLN_modulation`` is SiLU → a packed linear, ``SiLU(c)`` is quantized once per forward for
all of them (:class:`SharedConditioning`: the conditioning is the same for every block; shared within one call
of the model only) and each writes its modulation in float32, the type the kernels take it in.

The fused residual rounds once less than the unfused ``x + gate·y`` (the product stays float32, see
``kernels.packed_linear``), so the two agree to bf16 rounding, not bit for bit.

:func:`fuse_dit_blocks` swaps every ``DiTBlock`` whose ``qkv`` and ``fc1`` are packed for a
:class:`FusedDiTBlock` holding the same submodules (the state dict is unchanged).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import QuantizedActivation
from .linear import TreeQLinear, runs_packed_kernels as _quantized


class SharedConditioning:
    """SiLU(c) quantized once per forward and activation spec for the adaLN linears of all fused blocks of a model
    (27 fewer SiLU and quantization launches per DiT-XL/2 forward: launch latency, which is what they cost at
    batch 1). ``c`` is the same tensor object for every block of one forward (``DiT.forward`` computes it afresh
    each time), so a forward is recognised by it.

    The codes are shared only while the model runs: :meth:`attach` hooks the model so that each call opens a
    scope and its end (an exception included) closes it. Nothing is kept from one call to the next, so a ``c``
    that one caller passes to several calls with other contents in between (a CUDA graph's static input updated
    in place, a block captured or called on its own) never meets codes of its old contents, a graph captured
    after eager warm-up calls records its own quantization instead of reading a tensor from outside its pool,
    and the model holds no activations between forwards. A block called outside a model call quantizes its
    input itself every time."""

    def __init__(self) -> None:
        self._active = False
        self._scope: tuple | None = None   # (weakref to the forward's c, {act spec: its codes})

    def attach(self, model: nn.Module) -> None:
        """Share within each call of ``model`` (bound methods: a deep copy of the model hooks its own copy)."""
        model.register_forward_pre_hook(self._begin)
        model.register_forward_hook(self._end, always_call=True)

    def _begin(self, module: nn.Module, args: tuple) -> None:
        self._active, self._scope = True, None

    def _end(self, module: nn.Module, args: tuple, output: object) -> None:
        self._active, self._scope = False, None

    def __getstate__(self) -> dict:   # a weakref does not pickle; the scope is per call anyway
        return {"_active": False, "_scope": None}

    def codes(self, c: torch.Tensor, layer: TreeQLinear) -> QuantizedActivation:
        if layer.monarch_w1 is not None or not self._active:   # a branch's stage 1 belongs to its layer
            return layer.quantize_input(F.silu(c).contiguous())
        scope = self._scope   # read once: another thread's forward replacing it cannot mix two forwards' codes
        if scope is None or scope[0]() is not c:
            scope = self._scope = (weakref.ref(c), {})
        act = scope[1].get(layer.act_spec)
        if act is None:
            act = scope[1][layer.act_spec] = layer.quantize_input(F.silu(c).contiguous())
        return act


class FusedDiTBlock(nn.Module):
    def __init__(self, block: nn.Module, shared: SharedConditioning | None = None) -> None:
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
        ada = self.adaLN_modulation   # SiLU → packed linear: SiLU(c)'s codes shared, the modulation out in float32
        self.ada_fused = (isinstance(ada, nn.Sequential) and len(ada) == 2 and type(ada[0]) is nn.SiLU
                          and _quantized(ada[1]))
        self.shared = shared if shared is not None else SharedConditioning()

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """adaLN's six (N, D) vectors as one contiguous float32 (6, N, D): shift, scale, gate for the attention,
        then for the MLP. The quantization kernels take shift and scale as contiguous float32 (G, K) and the fused
        residual its gate as float32 (G, N). A packed adaLN linear writes float32 itself (at batch 1 the transpose
        below is free: no conversion kernel at all); the bf16 values other layers see are its rounding."""
        n = c.shape[0]
        ada = self.adaLN_modulation
        if self.ada_fused:
            mod = ada[1].linear(self.shared.codes(c, ada[1]), out_dtype=torch.float32)
        else:
            mod = ada(c)
        m32 = mod.view(n, 6, -1).transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        return m32.contiguous()   # .to() above is a no-op view when mod is float32 already

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        if c.dim() != 2 or c.shape[0] != n:   # the kernels would read the groups as repeats (G divides M)
            raise ValueError(f"conditioning c must be (N={n}, D), one row per sample, got {tuple(c.shape)}")
        if n == 0 or t == 0:   # nothing to compute (and the kernels' views of zero rows cannot infer a size)
            return x.clone()
        m32 = self.modulation(c)
        shift_msa, scale_msa, shift_mlp, scale_mlp = m32[0], m32[1], m32[3], m32[4]
        attn = self.attn
        x2 = x.reshape(n * t, d).contiguous()
        act = attn.qkv.quantize_input(x2, ln_eps=self.eps1, shift=shift_msa, scale=scale_msa)
        qkv = attn.qkv.linear(act, out_dtype=x.dtype).reshape(n, t, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * t, d)
        # the gates of a separate multiply and add in the activations' dtype: one conversion for both
        g16 = None if self.proj_residual and self.fc2_residual else m32[2::3].to(x.dtype)
        if self.proj_residual:
            x2 = attn.proj.linear(attn.proj.quantize_input(o.contiguous()), out_dtype=x.dtype, residual=x2,
                                  gate=m32[2])
        else:   # from x2 (contiguous), not x: the first block's input is a transposed view (the patch embedding),
            # whose sum with the product would reshape to non-contiguous rows at batch 1 (fc1's kernel takes rows)
            assert g16 is not None   # (None only when proj and fc2 both take the residual)
            x2 = (x2.view(n, t, d) + g16[0].unsqueeze(1) * attn.proj(o).reshape(n, t, d)).reshape(n * t, d)

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
        assert g16 is not None   # (fc2 does not take the residual here)
        return x2.reshape(n, t, d) + g16[1].unsqueeze(1) * y.reshape(n, t, d)


def fuse_dit_blocks(model: nn.Module) -> int:
    """Swap eligible blocks of a (packed) DiT for :class:`FusedDiTBlock`; returns how many were fused."""
    from ..models.dit import DiTBlock

    fused = 0
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return 0
    shared = SharedConditioning()   # one per model: its blocks share a forward's conditioning c
    for i, blk in enumerate(blocks):
        if isinstance(blk, DiTBlock) and _quantized(blk.attn.qkv) and _quantized(blk.mlp.fc1):
            blocks[i] = FusedDiTBlock(blk, shared)
            fused += 1
    if fused:
        shared.attach(model)   # shared within each call of the model
    return fused
