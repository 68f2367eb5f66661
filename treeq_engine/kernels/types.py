"""The operands the kernels exchange: a packed weight and a quantized activation.

Both carry what the integer epilogue needs (docs/format.md): scales, zero points and the code sums of the
*other* operand's correction.
"""
from __future__ import annotations

import dataclasses

import torch

from ..format import QuantSpec, QuantizedTensor, pack, quantize, unpack
from ..format.packing import LAYOUT_VERSION, packed_dtype, packed_shape


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight ``(N, K)`` quantized per output channel and packed in layout v1.

    packed      int32 (N, ⌈K/32⌉·bits) for 2/3/4-bit, int8 (N, K) for 8-bit
    scale       float32 (N,)          zero_point int32 (N,)
    col_sum     int32 (N,): Σ_k q[n, k] over the true K (the activation zero point's correction)
    """

    packed: torch.Tensor
    bits: int
    n: int
    k: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    col_sum: torch.Tensor
    symmetric: bool = False
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        if self.layout_version != LAYOUT_VERSION:
            raise ValueError(f"packed weight uses layout v{self.layout_version}; this build reads v{LAYOUT_VERSION}")
        want = packed_shape(self.n, self.k, self.bits)
        if tuple(self.packed.shape) != want or self.packed.dtype != packed_dtype(self.bits):
            raise ValueError(f"{self.bits}-bit packed weight for (N={self.n}, K={self.k}) must be "
                             f"{packed_dtype(self.bits)} {want}, got {self.packed.dtype} {tuple(self.packed.shape)}")
        for name, t, dt in (("scale", self.scale, torch.float32), ("zero_point", self.zero_point, torch.int32),
                            ("col_sum", self.col_sum, torch.int32)):
            if t.shape != (self.n,) or t.dtype != dt:
                raise ValueError(f"packed weight {name} must be {dt} ({self.n},), got {t.dtype} {tuple(t.shape)}")

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor) -> "PackedWeight":
        n, k = qt.codes.shape
        return cls(pack(qt.codes, qt.spec.bits), qt.spec.bits, n, k, qt.scale.contiguous(),
                   qt.zero_point.contiguous(), qt.row_sums(), qt.spec.symmetric)

    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec) -> "PackedWeight":
        return cls.from_quantized(quantize(w, spec))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def codes(self) -> torch.Tensor:
        """int8 codes (N, K)."""
        return unpack(self.packed, self.bits, self.k)

    def to(self, device: torch.device | str) -> "PackedWeight":
        return dataclasses.replace(self, packed=self.packed.to(device), scale=self.scale.to(device),
                                   zero_point=self.zero_point.to(device), col_sum=self.col_sum.to(device))


@dataclasses.dataclass(frozen=True)
class QuantizedActivation:
    """Per-token quantized rows ``(M, K)`` as int8 codes (3/4-bit values on their grid, stored one per byte).

    codes int8 (M, K); scale float32 (M,); zero_point int32 (M,); row_sum int32 (M,) = Σ_k codes[m, k];
    z: the Monarch stage-1 output (M, b, b·r) of the unquantized rows, or None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    row_sum: torch.Tensor
    bits: int
    z: torch.Tensor | None = None

    @property
    def m(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() - self.zero_point[:, None].float()) * self.scale[:, None]
