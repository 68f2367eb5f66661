import dataclasses

import pytest

from treeq_engine.format import ACT_BITS, WEIGHT_BITS, Granularity, QuantSpec, Role


@pytest.mark.parametrize("bits", WEIGHT_BITS + (16,))
def test_weight_bits_accepted(bits):
    s = QuantSpec.weight(bits)
    assert s.granularity is Granularity.PER_CHANNEL
    assert s.is_quantized == (bits != 16)


@pytest.mark.parametrize("bits", ACT_BITS + (16,))
def test_activation_bits_accepted(bits):
    assert QuantSpec.activation(bits).granularity is Granularity.PER_TOKEN


@pytest.mark.parametrize("role,bits", [("weight", 1), ("weight", 5), ("weight", 6), ("weight", 32),
                                       ("activation", 2), ("activation", 6), ("activation", 0)])
def test_unsupported_bits_rejected(role, bits):
    with pytest.raises(ValueError, match=f"unsupported {role} bit-width {bits}"):
        QuantSpec(bits=bits, role=role)


def test_bad_fields_rejected():
    with pytest.raises(TypeError, match="bits must be an int"):
        QuantSpec(bits=4.0)
    with pytest.raises(TypeError, match="bits must be an int"):
        QuantSpec(bits=True)
    with pytest.raises(ValueError, match="clip_ratio"):
        QuantSpec.weight(4, clip_ratio=0.0)
    with pytest.raises(ValueError, match="clip_ratio"):
        QuantSpec.weight(4, clip_ratio=1.5)
    with pytest.raises(ValueError):
        QuantSpec(bits=4, role="bias")
    with pytest.raises(TypeError, match="symmetric"):
        QuantSpec(bits=4, symmetric="yes")


def test_grid_and_frozen():
    s = QuantSpec.weight(3)
    assert (s.qmin, s.qmax, s.levels) == (-4, 3, 8)
    assert (QuantSpec.activation(8).qmin, QuantSpec.activation(8).qmax) == (-128, 127)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 4
    with pytest.raises(ValueError, match="no integer grid"):
        QuantSpec.weight(16).qmax


def test_json_roundtrip_and_unknown_fields():
    s = QuantSpec.activation(4, symmetric=True, clip_ratio=0.9)
    assert QuantSpec.from_dict(s.to_dict()) == s
    assert s.role is Role.ACTIVATION
    with pytest.raises(ValueError, match="unknown QuantSpec field"):
        QuantSpec.from_dict({"bits": 4, "granularity": "per_tensor"})
    with pytest.raises(ValueError, match="needs 'bits'"):
        QuantSpec.from_dict({"symmetric": True})
