"""The quantization spec: one frozen record per tensor, the single source of truth for the numeric format.

Codes are always *signed* integers in ``[qmin, qmax] = [-2**(b-1), 2**(b-1) - 1]`` so that every bit-width
feeds the same int8 tensor-core path (Hopper has no int4 MMA; see ``docs/sources.md``). The real value
of a code is ``scale * (q - zero_point)``:

* symmetric: ``zero_point = 0``, ``scale = clip * amax / qmax``; the grid keeps ``qmin`` (codes are clamped to
  ``[qmin, qmax]``, not ``[-qmax, qmax]``), but at ``clip = 1`` the largest magnitude lands on ``±qmax`` and
  ``qmin`` is never used: 2-bit symmetric has three levels. Values reach ``qmin`` only when clipping pushes them
  past ``-(qmax + ½)·scale``, i.e. with ``clip < qmax / (qmax + ½)`` (2/3 at 2 bits).
* asymmetric: the range ``[min(x, 0), max(x, 0)]`` shrunk by ``clip`` maps onto ``[qmin, qmax]``;
  ``zero_point`` is the integer code of 0.0, in ``[qmin, qmax]``, so 0.0 is exactly representable (padding
  and ReLU/GELU zeros stay exact).

Granularity: weights carry one (scale, zero_point) per output channel (row of the ``(N, K)`` weight);
activations carry one per token (row of the ``(M, K)`` activation), computed dynamically at run time.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

WEIGHT_BITS: tuple[int, ...] = (2, 3, 4, 8)
ACT_BITS: tuple[int, ...] = (3, 4, 8)
KEEP_BITS = 16  # "keep this tensor in bf16": not quantized at all


class Granularity(str, enum.Enum):
    PER_CHANNEL = "per_channel"  # weights (N, K): one scale per output row n
    PER_TOKEN = "per_token"  # activations (M, K): one scale per token row m, dynamic


class Role(str, enum.Enum):
    WEIGHT = "weight"
    ACTIVATION = "activation"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits == 16`` means the tensor stays in bf16 and every quantizer is the identity.
    """

    bits: int
    symmetric: bool = False
    role: Role = Role.WEIGHT
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        role = Role(self.role)  # accepts "weight"/"activation" strings from JSON
        object.__setattr__(self, "role", role)
        allowed = WEIGHT_BITS if role is Role.WEIGHT else ACT_BITS
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"QuantSpec.bits must be an int, got {type(self.bits).__name__}")
        if self.bits != KEEP_BITS and self.bits not in allowed:
            raise ValueError(
                f"unsupported {role.value} bit-width {self.bits}: expected one of {allowed} "
                f"or {KEEP_BITS} (keep bf16)"
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        clip = float(self.clip_ratio)
        if not (0.0 < clip <= 1.0):
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        object.__setattr__(self, "clip_ratio", clip)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def granularity(self) -> Granularity:
        return Granularity.PER_CHANNEL if self.role is Role.WEIGHT else Granularity.PER_TOKEN

    @property
    def is_quantized(self) -> bool:
        return self.bits != KEEP_BITS

    @property
    def qmin(self) -> int:
        self._require_quantized()
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        self._require_quantized()
        return (1 << (self.bits - 1)) - 1

    @property
    def levels(self) -> int:
        self._require_quantized()
        return 1 << self.bits

    def _require_quantized(self) -> None:
        if not self.is_quantized:
            raise ValueError("a bits=16 (keep bf16) spec has no integer grid")

    # -- constructors and JSON -------------------------------------------------------------------
    @classmethod
    def weight(cls, bits: int, symmetric: bool = False, clip_ratio: float = 1.0) -> "QuantSpec":
        return cls(bits=bits, symmetric=symmetric, role=Role.WEIGHT, clip_ratio=clip_ratio)

    @classmethod
    def activation(cls, bits: int, symmetric: bool = False, clip_ratio: float = 1.0) -> "QuantSpec":
        return cls(bits=bits, symmetric=symmetric, role=Role.ACTIVATION, clip_ratio=clip_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "role": self.role.value,
            "clip_ratio": self.clip_ratio,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantSpec field(s): {sorted(unknown)}")
        if "bits" not in d:
            raise ValueError("QuantSpec needs 'bits'")
        return cls(**d)

    def __str__(self) -> str:
        if not self.is_quantized:
            return f"{self.role.value}:bf16"
        kind = "sym" if self.symmetric else "asym"
        clip = "" if self.clip_ratio == 1.0 else f",clip={self.clip_ratio:g}"
        return f"{self.role.value}:int{self.bits}-{kind}{clip}"
