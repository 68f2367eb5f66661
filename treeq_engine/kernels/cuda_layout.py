"""Fragment layout v1: the packed-weight arrangement the CUDA GEMMs read, derived offline from layout v1.

The C++ core does the work on the CPU (``csrc/frag_repack.cpp``; the layout itself is documented in
``csrc/treeq/frag.h``). Weights are the MMA's A operand (rows = output channels) in tiles of 256 channels × 128 K;
each (16-row block, lane) slot of a tile holds the 64 codes that lane feeds to four ``m16n8k32`` / ``wgmma
m64nNk32`` k-steps, as 2·bits words that unpack to int8 registers with one shift and one mask. ``row_chan``
records the original channel of every tile row; rows are in channel order (a Monarch branch's output blocks are
contiguous, so a tile already meets few of them), and the kernels read the map instead of assuming it.

The artifact format stays layout v1. A weight reaches the kernels in this layout one of two ways: a cache
(``cuda_operands``) built when a CUDA kernel first needs a layout-v1 weight, keyed by the weight's packed tensor and
the device, and rebuilt after an in-place change of the weight's tensors (both layouts then sit on the device); or
a module that holds only this layout on its device (``TreeQLinear.set_layout("frag")``, what the runtime does for
layers the CUDA kernels run), converting back to layout v1 for its state dict.
"""
from __future__ import annotations

import functools

import torch

from .. import core
from ..format.packing import PACKABLE_BITS, packed_dtype, packed_shape
from .derived import derived
from .types import FragWeight, PackedWeight

TILE_N = 256  # output channels per tile (MMA M side)
TILE_K = 128  # K per tile (one 128-byte swizzle row of int8 activations)
VERSION = 1


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"unsupported weight bit-width {bits}: expected one of {PACKABLE_BITS}")


def channel_tiles(n: int) -> int:
    return -(-n // TILE_N)


def k_tiles(k: int) -> int:
    return -(-k // TILE_K)


def total_words(n: int, k: int, bits: int) -> int:
    _check_bits(bits)
    return channel_tiles(n) * k_tiles(k) * 1024 * bits


def field_offset(bits: int) -> int:
    """The kernels multiply sub-8-bit weights as offset-binary fields u = q + offset (8-bit: signed, offset 0)."""
    _check_bits(bits)
    return 0 if bits == 8 else 1 << (bits - 1)


def _check_int32_cpu(t: object, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.device.type != "cpu" or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must be a 1-D int32 CPU tensor, got {got}")


def tile_rows(n: int) -> torch.Tensor:
    """int32 ``(channel_tiles(n)·256,)``: the original channel of each tile row (-1 for padding rows)."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"N must be a positive int, got N={n!r}")
    return torch.from_numpy(core.load().frag_tile_rows(n))


@functools.lru_cache(maxsize=None)
def tile_rows_on(n: int, device: torch.device) -> torch.Tensor:
    """:func:`tile_rows` on ``device``, one shared tensor per (N, device): it depends on N alone."""
    return tile_rows(n).to(device)


def repack(packed: torch.Tensor, bits: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout-v1 ``packed (N, ·)`` (CPU) → ``(words int32 (total_words,), row_chan int32)``."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.device.type != "cpu":
        raise ValueError("repack takes the layout-v1 packed weight as a CPU tensor")
    if packed.dtype != packed_dtype(bits) or tuple(packed.shape) != packed_shape(n, k, bits):
        raise ValueError(f"{bits}-bit layout-v1 weight for (N={n}, K={k}) must be {packed_dtype(bits)} "
                         f"{packed_shape(n, k, bits)}, got {packed.dtype} {tuple(packed.shape)}")
    row_chan = tile_rows(n)
    words = core.load().frag_repack(packed.contiguous().numpy(), bits, n, k, row_chan.numpy())
    return torch.from_numpy(words), row_chan


def unrepack(words: torch.Tensor, row_chan: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`repack`: int8 codes ``(N, K)``. Raises if a padding field is not code 0."""
    _check_bits(bits)
    _check_int32_cpu(words, "words")
    _check_int32_cpu(row_chan, "row_chan")
    codes, padding_ok = core.load().frag_unrepack(words.contiguous().numpy(), row_chan.contiguous().numpy(),
                                                  bits, n, k)
    if not padding_ok:
        raise ValueError("fragment-layout padding (rows ≥ N or k ≥ K) holds a nonzero code")
    return torch.from_numpy(codes)


def registers(words: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """The A-fragment registers the kernels build from ``words``, unpacked by the kernels' own header code:
    int64 ``(channel tile, k tile, 16 row blocks, 32 lanes, 4 k-steps, 4 registers)`` holding uint32 values."""
    _check_bits(bits)
    _check_int32_cpu(words, "words")
    r = torch.from_numpy(core.load().frag_registers(words.contiguous().numpy(), bits, n, k))
    return r.to(torch.int64) & 0xFFFFFFFF


def u_domain(zero_point: torch.Tensor, col_sum: torch.Tensor, bits: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' per-channel corrections in the offset-binary domain: ``(zero point + offset, Σ_k q + offset·K)``
    as int32 on the tensors' device."""
    off = field_offset(bits)
    uzp = zero_point.to(torch.int64) + off
    ucs = col_sum.to(torch.int64) + off * k
    return uzp.to(torch.int32), ucs.to(torch.int32)


def build_operands(weight: PackedWeight, device: torch.device) -> FragWeight:
    """Repack ``weight`` (layout v1) on the CPU and move the operands to ``device``."""
    assert weight.packed is not None   # (layout v1: a weight without packed codes carries its frag instead)
    words, row_chan = repack(weight.packed.cpu(), weight.bits, weight.n, weight.k)
    uzp, ucs = u_domain(weight.zero_point.cpu(), weight.col_sum.cpu(), weight.bits, weight.k)
    return FragWeight(words.to(device), tile_rows_on(weight.n, device),   # (the shared map: see frag_weight)
                      weight.scale.to(device, torch.float32).contiguous(),
                      uzp.to(device), ucs.to(device), weight.bits, weight.n, weight.k)


def frag_weight(words: torch.Tensor, row_chan: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                col_sum: torch.Tensor, bits: int, n: int, k: int, *, shared: bool = False) -> FragWeight:
    """The :class:`FragWeight` of codes already held in fragment layout (``words``, ``row_chan``) with the weight's
    own scale, zero point and column sums (the holder caches it: ``TreeQLinear.packed_weight``).

    The kernels index scales, corrections and output columns by ``row_chan``'s values, so it must be the layout's
    own map: the shared ``tile_rows_on`` tensor is taken as is, any other is compared with it once, here (a host
    read; never in a launch, which may be under CUDA-graph capture), and replaced by it. ``shared``: the caller
    vouches that ``row_chan`` holds the layout's map, taken from ``tile_rows_on`` on its device (or a copy of that
    tensor: a copied layer's), and it is taken as is (under ``torch.compile``, which cannot call the core that
    builds the map, the holder hands the one it took eagerly)."""
    uzp, ucs = u_domain(zero_point, col_sum, bits, k)
    if shared:
        return FragWeight(words, row_chan, scale.contiguous(), uzp, ucs, bits, n, k)
    shared_map = tile_rows_on(n, words.device)
    if row_chan is not shared_map:
        if not isinstance(row_chan, torch.Tensor) or not torch.equal(row_chan.cpu(), tile_rows(n)):
            raise ValueError("fragment-layout row_chan is not the layout's channel map (cuda_layout.tile_rows(N))")
        row_chan = shared_map
    return FragWeight(words, row_chan, scale.contiguous(), uzp, ucs, bits, n, k)


def cuda_operands(weight: PackedWeight) -> FragWeight:
    """The :class:`FragWeight` of ``weight`` on its own device: the one it carries, else one built from layout v1
    on first use and cached. The cache lives as long as ``weight.packed`` and is rebuilt when any of the weight's
    tensors was changed in place (a module whose buffers are loaded after a first forward, say)."""
    if weight.frag is not None:
        return weight.frag
    return derived(weight.packed, ("cuda_frag", str(weight.device)),
                   (weight.packed, weight.scale, weight.zero_point, weight.col_sum),
                   lambda: build_operands(weight, weight.device))
