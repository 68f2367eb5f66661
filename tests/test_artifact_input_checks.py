"""An artifact changed after saving, or written by other code, is refused with a named reason before the model is
touched (found by a bad-input review): the plan's checksum, every packed layer's tensors and values, the other
tensors' shapes, a manifest that is not an object, a missing plan, a CUDA map_location without CUDA."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from treeq_engine.plan import LayerConfig, QuantPlan
from treeq_engine.runtime import TreeQLinear, artifact, quantize


def model(classes=10):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(classes, 40), torch.nn.Linear(40, 24), torch.nn.Linear(24, 16))


PLAN = QuantPlan({"1": LayerConfig(4, 8), "2": LayerConfig(3, 8, w_symmetric=True)})


@pytest.fixture
def art(tmp_path):
    m = model()
    fp = artifact.fingerprint(m, PLAN)
    quantize(m, PLAN, dtype=torch.float32)
    return artifact.save(m, PLAN, tmp_path / "art", fp_fingerprint=fp)


def rewrite(art, edit):
    """Change the saved tensors and re-sum them, as other code writing the file would."""
    path = art / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    man = json.loads((art / "manifest.json").read_text())
    man["sha256"] = artifact._sha256(path)
    (art / "manifest.json").write_text(json.dumps(man))


def untouched(m):
    return not any(isinstance(x, TreeQLinear) for x in m.modules())


def test_a_good_artifact_loads(art):
    m = artifact.load(art, model(), dtype=torch.float32)
    assert isinstance(m[1], TreeQLinear) and isinstance(m[2], TreeQLinear)


def test_the_plan_is_summed(art):
    text = (art / "plan.json").read_text()
    (art / "plan.json").write_text(text.replace('"a_bits": 8', '"a_bits": 4', 1))
    m = model()
    with pytest.raises(artifact.ArtifactError, match="plan.json was changed or is corrupt"):
        artifact.load(art, m)
    assert untouched(m)
    (art / "plan.json").unlink()
    with pytest.raises(artifact.ArtifactError, match="plan.json is missing"):
        artifact.load(art, m)


def test_manifest_must_be_an_object(art):
    (art / "manifest.json").write_text("[1, 2]")
    with pytest.raises(artifact.ArtifactError, match="must hold a JSON object, got list"):
        artifact.load(art, model())
    (art / "manifest.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(artifact.ArtifactError, match="not valid JSON"):
        artifact.read_manifest(art)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.__setitem__("1.w_packed", s["1.w_packed"].float()), r"1.w_packed must be torch.int32"),
    (lambda s: s.__setitem__("1.w_zero_point", s["1.w_zero_point"].long()), r"1.w_zero_point must be torch.int32"),
    (lambda s: s["1.w_scale"].__setitem__(3, float("nan")), "1.w_scale must be finite and positive"),
    (lambda s: s["1.w_scale"].__setitem__(0, -1.0), "1.w_scale must be finite and positive"),
    (lambda s: s["1.w_zero_point"].__setitem__(0, 500), r"1.w_zero_point must lie in \[-8, 7\]"),
    (lambda s: s["2.w_zero_point"].__setitem__(0, 1), r"2.w_zero_point must lie in \[0, 0\].*symmetric"),
    (lambda s: s["1.w_col_sum"].__setitem__(0, 40 * 7 + 1), r"w_col_sum lies outside \[K·qmin, K·qmax\]"),
    (lambda s: s.pop("2.w_scale"), "2.w_scale is missing"),
    (lambda s: s["2.bias"].__setitem__(0, float("inf")), "2.bias must be finite"),
    (lambda s: s.__setitem__("0.weight", torch.zeros(12, 40)), r"0.weight is torch.float32 \(12, 40\), the model's"),
])
def test_tensors_and_values_are_checked_before_the_model_changes(art, edit, match):
    rewrite(art, edit)
    m = model()
    with pytest.raises(artifact.ArtifactError, match=match):
        artifact.load(art, m)
    assert untouched(m)


def test_another_config_is_named(art):
    m = model(classes=12)   # same linears (same fingerprint), another embedding
    with pytest.raises(artifact.ArtifactError, match="0.weight .* built with another config"):
        artifact.load(art, m)
    assert untouched(m)


def test_cuda_map_location_without_cuda(art):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(artifact.ArtifactError, match="no CUDA device is available"):
        artifact.load(art, model(), map_location="cuda")


def test_column_sums_exactly_on_request(art):
    """The exact check unpacks every weight (slow for large models), so it is asked for: verify_codes."""
    rewrite(art, lambda s: s["1.w_col_sum"].__setitem__(0, s["1.w_col_sum"][0] + 1))
    artifact.load(art, model())   # within bounds: only the exact check sees it
    m = model()
    with pytest.raises(artifact.ArtifactError, match="w_col_sum does not equal the sums of its codes"):
        artifact.load(art, m, verify_codes=True)
    assert untouched(m)
