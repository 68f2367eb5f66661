import pytest
import torch

from treeq_engine.branches import MonarchShape, monarch


def _random_factors(gen, n, k, b, r):
    s = MonarchShape(n, k, b, r)
    return (s, torch.randn(s.w1_shape, generator=gen, dtype=torch.float64),
            torch.randn(s.w2_shape, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("n,k,b,r", [(50, 37, 4, 2), (48, 64, 8, 1), (7, 9, 1, 3), (36, 36, 6, 1)])
def test_stages_equal_dense(n, k, b, r, gen):
    s, w1, w2 = _random_factors(gen, n, k, b, r)
    x = torch.randn(5, k, generator=gen, dtype=torch.float64)
    dense = monarch.to_dense(w1, w2, n, k)
    assert dense.shape == (n, k)
    z = monarch.stage1(x, w1)
    assert z.shape == (5, b, b * r) and s.z_width == b * b * r
    torch.testing.assert_close(monarch.stage2(z, w2, n), x @ dense.T)
    # explicit formula: B[j·Nb + l, i·b + k] = Σ_s w2[j, l, k·r + s] · w1[k, j·r + s, i]
    for o, c in [(n - 1, k - 1), (0, 0), (min(s.nb, n - 1), min(b + 1, k - 1)), (n // 2, k // 3)]:
        j, l, kk, i = o // s.nb, o % s.nb, c % b, c // b
        want = sum(w2[j, l, kk * r + t] * w1[kk, j * r + t, i] for t in range(r))
        torch.testing.assert_close(dense[o, c], want)


def test_lowrank_is_one_block(gen):
    s, w1, w2 = _random_factors(gen, 20, 30, 1, 4)
    torch.testing.assert_close(monarch.to_dense(w1, w2, 20, 30), w2[0] @ w1[0])
    assert s.params == 4 * (20 + 30)


def test_projection_exact_and_optimal(gen):
    n, k, b, r = 40, 24, 4, 2
    s, w1, w2 = _random_factors(gen, n, k, b, r)
    dense = monarch.to_dense(w1, w2, n, k)
    p1, p2 = monarch.project(dense, b, r)
    rel = (monarch.to_dense(p1.double(), p2.double(), n, k) - dense).norm() / dense.norm()
    assert rel < 1e-5
    # identity: the known 1/3 relative error at b = 32 on 1152 (docs/sources.md)
    eye = torch.eye(1152)
    q1, q2 = monarch.project(eye, 32, 1)
    assert abs(float((monarch.to_dense(q1, q2, 1152, 1152) - eye).norm() / eye.norm()) - 1 / 3) < 1e-3


def test_default_size_and_errors():
    s = MonarchShape.matching_lowrank(3456, 1152)
    assert s.blocks == 32 and s.rank == 1
    assert s.params == 32 * (1152 + 3456)
    with pytest.raises(ValueError, match="blocks=9 exceeds"):
        MonarchShape(8, 20, 9, 1)
    with pytest.raises(ValueError, match="must be w1"):
        MonarchShape.of(torch.zeros(2, 2, 3), torch.zeros(2, 4, 3), 8, 6)


def test_blocks_have_rank_r(gen):
    """Every (j, k) block of B (rows j·Nb + l, columns i·b + k) has rank r; B as a whole reaches b²·r."""
    n, k, b, r = 48, 40, 4, 2
    s, w1, w2 = _random_factors(gen, n, k, b, r)
    dense = monarch.to_dense(w1, w2, n, k)
    for j in range(b):
        for kk in range(b):
            assert torch.linalg.matrix_rank(dense[j * s.nb:(j + 1) * s.nb, kk::b]) == r
    assert torch.linalg.matrix_rank(dense) == min(b * b * r, n, k)
