"""Helpers for the Triton backend tests: skip without Triton, poisoned outputs, tie-aware code comparison."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed")

from treeq_engine.kernels.triton import runtime  # noqa: E402

# Triton runs here interpreted on CPU tensors, or compiled on CUDA tensors; tests follow.
DEVICE = torch.device("cpu") if runtime.INTERPRET else torch.device("cuda")
if not runtime.INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture
def poisoned(monkeypatch):
    """Every launcher output starts as garbage (NaN / 0x5A bytes), so an element the kernel forgets to write
    shows up in the comparison with the oracle."""

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if dtype.is_floating_point:
            return t.fill_(float("nan"))
        return t.fill_(0x5A if dtype == torch.int8 else 0x5A5A5A5A)

    monkeypatch.setattr(runtime, "empty", empty)


def assert_codes_match_up_to_ties(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, xhat_ref: torch.Tensor,
                                  ref, spec, tol: float = 2e-4) -> None:
    """Codes equal the oracle's (``ref``, a QuantizedTensor/QuantizedActivation of ``xhat_ref``) except by one
    where the oracle's unrounded value sits within ``tol`` (relative) of a rounding boundary ``k + ½``: the
    code ``x̂/s`` itself, or the zero point ``qmin − lo/s`` (then the whole row may shift). Fused LayerNorm
    reduces in another order than ``F.layer_norm``, so x̂ and the scale may differ in their last bits; that moves
    a value across a boundary only when it sits on one."""
    torch.testing.assert_close(scale, ref.scale, rtol=1e-5, atol=0)

    def near_tie(u: torch.Tensor) -> torch.Tensor:
        return ((u - u.floor()) - 0.5).abs() < tol * u.abs().clamp(min=1.0)

    s = ref.scale.double()
    x = xhat_ref.double()
    dz = (zp.long() - ref.zero_point.long()).abs()
    assert int(dz.max()) <= 1, f"zero points differ by {int(dz.max())}"
    if not spec.symmetric:
        lo = x.amin(dim=1).clamp(max=0.0) * spec.clip_ratio
        assert not bool(((dz > 0) & ~near_tie(spec.qmin - lo / s)).any()), "zero point differs away from a tie"
    diff = (codes.long() - ref.codes.long()).abs()
    assert int(diff.max()) <= 1, f"codes differ by {int(diff.max())}"
    bad = (diff > 0) & ~(near_tie(x / s[:, None]) | (dz > 0)[:, None])
    assert not bool(bad.any()), (f"{int(bad.sum())} codes differ away from a rounding tie, first at "
                                 f"{tuple(bad.nonzero()[0].tolist())}")
