"""Bit-packing of integer codes along K: the canonical, versioned storage layout (``LAYOUT_VERSION``).

Layout v1 (row-major; each row of ``(R, K)`` codes is packed independently along K):

* A *field* is the code in offset binary: ``u = q - qmin = q + 2**(b-1)``, in ``[0, 2**b)``.
* 8-bit: no packing; the int8 codes ``(R, K)`` themselves.
* 2, 3 and 4-bit: K is padded up to a multiple of 32 with **code 0** (field ``2**(b-1)``), and every group of
  32 consecutive codes becomes ``b`` little-endian int32 words, so the packed tensor is int32
  ``(R, ceil(K/32) * b)``:

  - 2-bit: word ``w`` (0..1) holds codes ``16w .. 16w+15``, code ``16w + j`` in bits ``[2j, 2j+2)``.
  - 4-bit: word ``w`` (0..3) holds codes ``8w .. 8w+7``, code ``8w + j`` in bits ``[4j, 4j+4)``.
  - 3-bit, dense bit planes: words 0 and 1 hold the low two bits of codes 0..15 and 16..31 exactly as
    2-bit does; word 2 holds the high bit of code ``j`` in bit ``j``. 96 bits for 32 codes, no waste, and
    no field straddles a word, so a kernel unpacks with one shift and one mask per plane.

Why code 0 as padding: the integer GEMM multiplies codes, and one operand's zero codes contribute nothing,
so a padded K needs no masking; zero-point corrections use the true K and row sums over the true K.

Kernels that want another arrangement (per-thread MMA fragments, say) derive it from this one offline; an
artifact always stores layout v1 and records the version.
"""
from __future__ import annotations

import torch

from .spec import WEIGHT_BITS, ACT_BITS

LAYOUT_VERSION = 1
GROUP = 32  # codes per packing group (one group = `bits` int32 words)
PACKABLE_BITS = tuple(sorted(set(WEIGHT_BITS) | set(ACT_BITS)))  # (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"unsupported bit-width {bits} for packing: expected one of {PACKABLE_BITS}")


def padded_k(k: int, bits: int) -> int:
    """K after padding for ``bits`` (8-bit is never padded)."""
    _check_bits(bits)
    return k if bits == 8 else -(-k // GROUP) * GROUP


def packed_shape(rows: int, k: int, bits: int) -> tuple[int, int]:
    """Shape of ``pack(codes (rows, k), bits)``."""
    _check_bits(bits)
    if bits == 8:
        return (rows, k)
    return (rows, padded_k(k, bits) // GROUP * bits)


def packed_dtype(bits: int) -> torch.dtype:
    _check_bits(bits)
    return torch.int8 if bits == 8 else torch.int32


def check_codes(codes: torch.Tensor, bits: int, what: str = "codes") -> None:
    """Raise a clear error unless ``codes`` is a contiguous int8 ``(R, K)`` tensor within the ``bits`` grid."""
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.int8:
        raise TypeError(f"{what} must be int8, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, K), got shape {tuple(codes.shape)}")
    if not codes.is_contiguous():
        raise ValueError(f"{what} must be contiguous (row-major, K fastest)")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and bits < 8:
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < lo or cmax > hi:
            raise ValueError(f"{what} out of range for {bits}-bit: found [{cmin}, {cmax}], allowed [{lo}, {hi}]")


def _to_int32_words(w: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(w >= (1 << 31), w - (1 << 32), w).to(torch.int32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes ``(R, K)`` into layout v1 (see module docstring)."""
    check_codes(codes, bits)
    if bits == 8:
        return codes.clone()
    rows, k = codes.shape
    kp = padded_k(k, bits)
    u = torch.full((rows, kp), 1 << (bits - 1), dtype=torch.int64, device=codes.device)  # pad: code 0
    u[:, :k] = codes.to(torch.int64) + (1 << (bits - 1))
    groups = kp // GROUP
    if bits in (2, 4):
        per = 32 // bits
        u = u.view(rows, groups, bits, per)
        shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
        words = (u << shifts).sum(dim=-1)  # fields are disjoint: sum == bitwise or
        return _to_int32_words(words).reshape(rows, groups * bits)
    # 3-bit: two 2-bit low planes + one 1-bit high plane per group.
    u = u.view(rows, groups, GROUP)
    low = (u & 3).view(rows, groups, 2, 16)
    low_words = (low << (torch.arange(16, device=codes.device, dtype=torch.int64) * 2)).sum(dim=-1)
    high = (u >> 2) & 1
    high_word = (high << torch.arange(32, device=codes.device, dtype=torch.int64)).sum(dim=-1, keepdim=True)
    words = torch.cat([low_words, high_word], dim=-1)
    return _to_int32_words(words).reshape(rows, groups * 3)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int8 codes ``(R, k)`` (padding dropped)."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D, got shape {tuple(packed.shape)}")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    rows = packed.shape[0]
    want = packed_shape(rows, k, bits)
    if packed.dtype != packed_dtype(bits):
        raise TypeError(f"packed {bits}-bit tensor must be {packed_dtype(bits)}, got {packed.dtype}")
    if tuple(packed.shape) != want:
        raise ValueError(f"packed {bits}-bit tensor for K={k} must have shape {want}, got {tuple(packed.shape)}")
    if bits == 8:
        return packed.contiguous().clone()
    groups = want[1] // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    dev = packed.device
    if bits in (2, 4):
        per = 32 // bits
        w = w.view(rows, groups, bits, 1)
        shifts = torch.arange(per, device=dev, dtype=torch.int64) * bits
        u = (w >> shifts) & ((1 << bits) - 1)
        u = u.reshape(rows, groups * GROUP)
    else:
        w = w.view(rows, groups, 3)
        low = (w[..., :2, None] >> (torch.arange(16, device=dev, dtype=torch.int64) * 2)) & 3
        high = (w[..., 2:3] >> torch.arange(32, device=dev, dtype=torch.int64)) & 1
        u = (low.reshape(rows, groups, GROUP) | (high << 2)).reshape(rows, groups * GROUP)
    return (u[:, :k] - (1 << (bits - 1))).to(torch.int8).contiguous()
