"""The triton backend's registration, dispatch and torch custom ops."""
import pytest
import torch

from triton_testing import DEVICE
from treeq_engine.branches import MonarchShape
from treeq_engine.format import QuantSpec
from treeq_engine.kernels import PackedWeight, backends, ops, reference
from treeq_engine.kernels.triton import backend, runtime

# the Triton 3.6 interpreter converts 1-element arrays to loop bounds (NumPy deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def test_registered_and_dispatch(gen):
    assert "triton" in backends()
    x = torch.randn(4, 32, generator=gen).to(DEVICE)
    fn = ops._pick("quantize_activation", None, (x, QuantSpec.activation(8)), {})
    if runtime.INTERPRET:  # the interpreter runs only when asked for; CPU calls stay on the reference
        assert fn is reference.quantize_activation
        assert ops._pick("quantize_activation", "triton", (x, QuantSpec.activation(8)), {}) is \
            backend.quantize_activation
    else:  # CUDA tensors pick Triton by themselves (unless a higher-priority backend claims them)
        assert ops.backends().index("triton") < ops.backends().index("reference")


def test_forced_on_unsupported_device_is_a_clear_error(gen):
    if runtime.INTERPRET:
        pytest.skip("every CPU tensor is runnable under the interpreter")
    x = torch.randn(4, 32, generator=gen)  # CPU tensor, compiled Triton
    with pytest.raises(RuntimeError, match="cannot run"):
        ops.quantize_activation(x, QuantSpec.activation(8), backend="triton")


def test_opcheck(gen):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both custom ops."""
    m, n, k = 6, 24, 40
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    s = MonarchShape(n, k, 4, 1)
    w1 = torch.randn(s.w1_shape, generator=gen).to(DEVICE)
    w2 = torch.randn(s.w2_shape, generator=gen).to(DEVICE)
    shift, scale = (torch.randn(2, k, generator=gen).to(DEVICE) for _ in range(2))
    torch.library.opcheck(torch.ops.treeq_triton.quantize_activation.default,
                          (x, 4, False, 0.9, 1e-6, shift, scale, w1, DEVICE.type == "cuda"))
    act = backend.quantize_activation(x, QuantSpec.activation(8), monarch_w1=w1)
    pw = PackedWeight.from_float(torch.randn(n, k, generator=gen), QuantSpec.weight(3)).to(DEVICE)
    torch.library.opcheck(torch.ops.treeq_triton.packed_linear.default,
                          (act.codes, act.scale, act.zero_point, act.row_sum, act.z, pw.packed, 3, n, pw.scale,
                           pw.zero_point, pw.col_sum, torch.randn(n, generator=gen).to(DEVICE), w2, True,
                           torch.bfloat16))


def test_fake_tensor_shapes(gen):
    """torch.compile / graph tracing sees output shapes and dtypes without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 48, device=DEVICE)
        codes, sa, za, ra, z = torch.ops.treeq_triton.quantize_activation(x, 8, False, 1.0, None, None, None,
                                                                          torch.empty(3, 6, 16, device=DEVICE),
                                                                          True)
        assert codes.shape == (7, 48) and codes.dtype == torch.int8 and z.shape == (7, 3, 6)
        assert z.dtype == torch.bfloat16 and sa.dtype == torch.float32 and ra.dtype == torch.int32
        y = torch.ops.treeq_triton.packed_linear(codes, sa, za, ra, None, torch.empty(20, 6, dtype=torch.int32,
                                                                                      device=DEVICE),
                                                 4, 20, torch.empty(20, device=DEVICE),
                                                 torch.empty(20, dtype=torch.int32, device=DEVICE),
                                                 torch.empty(20, dtype=torch.int32, device=DEVICE), None, None,
                                                 False, torch.float16)
        assert y.shape == (7, 20) and y.dtype == torch.float16
