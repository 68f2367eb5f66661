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
class FragWeight:
    """A weight in fragment layout v1, the CUDA GEMMs' operand (``kernels/cuda_layout.py``), on one device.

    words     int32 (total_words,)  fragment layout v1
    row_chan  int32 (tiles·256,)    original channel of each tile row
    scale     float32 (N,)          per-channel scale
    uzp       int32 (N,)            zero point + field offset (u-domain)
    ucs       int32 (N,)            Σ_k q + field offset · K (u-domain code sums)
    """

    words: torch.Tensor
    row_chan: torch.Tensor
    scale: torch.Tensor
    uzp: torch.Tensor
    ucs: torch.Tensor
    bits: int
    n: int
    k: int

    @property
    def device(self) -> torch.device:
        return self.words.device

    def check(self) -> None:
        """Sizes, dtypes, contiguity and device of the operands: the CUDA kernels read them as raw pointers."""
        from .cuda_layout import TILE_N, channel_tiles, total_words

        n = self.n
        for name, t, numel, dt in (("words", self.words, total_words(n, self.k, self.bits), torch.int32),
                                   ("row_chan", self.row_chan, channel_tiles(n) * TILE_N, torch.int32),
                                   ("scale", self.scale, n, torch.float32), ("uzp", self.uzp, n, torch.int32),
                                   ("ucs", self.ucs, n, torch.int32)):
            if t.dim() != 1 or t.numel() != numel or t.dtype != dt or not t.is_contiguous():
                raise ValueError(f"fragment-layout {name} must be contiguous {dt} ({numel},), got {t.dtype} "
                                 f"{tuple(t.shape)}")
            if t.device != self.words.device:
                raise ValueError(f"fragment-layout {name} is on {t.device}, its words on {self.words.device}")


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight ``(N, K)`` quantized per output channel and packed in layout v1.

    packed      int32 (N, ⌈K/32⌉·bits) for 2/3/4-bit, int8 (N, K) for 8-bit; or None when ``frag`` holds the codes
    scale       float32 (N,)          zero_point int32 (N,)
    col_sum     int32 (N,): Σ_k q[n, k] over the true K (the activation zero point's correction)
    frag        the same codes in the CUDA kernels' fragment layout, when the holder keeps them that way on the
                device instead of in layout v1 (half the resident bytes; ``runtime.linear.TreeQLinear.set_layout``);
                backends that read layout v1 decline such a weight, the reference unpacks it
    """

    packed: torch.Tensor | None
    bits: int
    n: int
    k: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    col_sum: torch.Tensor
    symmetric: bool = False
    layout_version: int = LAYOUT_VERSION

    frag: FragWeight | None = None

    def __post_init__(self) -> None:
        if self.layout_version != LAYOUT_VERSION:
            raise ValueError(f"packed weight uses layout v{self.layout_version}; this build reads v{LAYOUT_VERSION}")
        if self.frag is not None:
            self._check_frag()
            if self.packed is None:
                return self._check_qparams()
        if self.packed is None:
            raise ValueError("a packed weight needs its codes: packed (layout v1) or frag (fragment layout)")
        want = packed_shape(self.n, self.k, self.bits)
        if tuple(self.packed.shape) != want or self.packed.dtype != packed_dtype(self.bits):
            raise ValueError(f"{self.bits}-bit packed weight for (N={self.n}, K={self.k}) must be "
                             f"{packed_dtype(self.bits)} {want}, got {self.packed.dtype} {tuple(self.packed.shape)}")
        if not self.packed.is_contiguous():   # the kernels read it as rows of words
            raise ValueError(f"packed weight codes must be contiguous, got strides {self.packed.stride()}")
        self._check_qparams()

    def _check_frag(self) -> None:
        """The fragment-layout operands (:meth:`FragWeight.check`) and their agreement with this weight. When both
        layouts are given they must hold the same codes; that is the caller's contract, not checked here."""
        f = self.frag
        assert f is not None   # (called only when frag is set)
        if (f.bits, f.n, f.k) != (self.bits, self.n, self.k):
            raise ValueError(f"fragment-layout weight is {f.bits}-bit (N={f.n}, K={f.k}), the packed weight "
                             f"{self.bits}-bit (N={self.n}, K={self.k})")
        f.check()

    def _check_qparams(self) -> None:
        """Per-channel vectors: the kernels read them as raw memory beside the codes, so the same device and
        contiguous (a strided view or a vector left on another device would be read as garbage)."""
        device = self.anchor.device
        for name, t, dt in (("scale", self.scale, torch.float32), ("zero_point", self.zero_point, torch.int32),
                            ("col_sum", self.col_sum, torch.int32)):
            if t.shape != (self.n,) or t.dtype != dt or not t.is_contiguous():
                raise ValueError(f"packed weight {name} must be contiguous {dt} ({self.n},), got {t.dtype} "
                                 f"{tuple(t.shape)} strides {t.stride()}")
            if t.device != device:
                raise ValueError(f"packed weight {name} is on {t.device}, its codes on {device}")

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
        return self.anchor.device

    @property
    def anchor(self) -> torch.Tensor:
        """The tensor holding the codes (layout v1, else the fragment words): caches of derived operands key on it."""
        if self.packed is not None:
            return self.packed
        assert self.frag is not None   # (__post_init__: a weight without packed codes has frag)
        return self.frag.words

    def codes(self) -> torch.Tensor:
        """int8 codes (N, K), on the weight's device."""
        if self.packed is not None:
            return unpack(self.packed, self.bits, self.k)
        from .cuda_layout import unrepack   # C++ core, on the CPU

        f = self.frag
        assert f is not None   # (no packed codes: __post_init__ requires frag)
        return unrepack(f.words.cpu(), f.row_chan.cpu(), self.bits, self.n, self.k).to(self.device)

    def to(self, device: torch.device | str) -> "PackedWeight":
        frag = None if self.frag is None else dataclasses.replace(
            self.frag, **{f: getattr(self.frag, f).to(device) for f in ("words", "row_chan", "scale", "uzp", "ucs")})
        return dataclasses.replace(self, packed=None if self.packed is None else self.packed.to(device),
                                   scale=self.scale.to(device), zero_point=self.zero_point.to(device),
                                   col_sum=self.col_sum.to(device), frag=frag)


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
