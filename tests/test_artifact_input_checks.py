"""An artifact changed after saving, or written by other code, is refused with a named reason before the model is
touched (found by a bad-input review): the plan's checksum, every packed layer's tensors and values, the other
tensors' shapes, a manifest that is not an object, a missing plan, a CUDA map_location without CUDA."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan
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
    (lambda s: s.pop("2.bias"), "2.bias is missing"),
    (lambda s: s.__setitem__("1.bias", torch.zeros(23)), r"1.bias must be \(24,\)"),
    (lambda s: s.__setitem__("1.monarch_w1", torch.zeros(4, 4, 10)),
     "1.monarch_w1 is there, but the W4A8 layer has none"),
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


BRANCHED = QuantPlan({"1": LayerConfig(4, 8, branch=BranchConfig("monarch", 4, 1)), "2": LayerConfig(8, 8)})


def test_branch_factors_checked_and_kept_as_stored(tmp_path):
    """A float32 build's factors load unrounded (the dtype is the artifact's unless asked), so save -> load gives
    the saved outputs exactly; a factor of another shape than the plan's branch is refused before any swap."""
    m = model()
    fp = artifact.fingerprint(m, BRANCHED)
    quantize(m, BRANCHED, dtype=torch.float32)
    art = artifact.save(m, BRANCHED, tmp_path / "art", fp_fingerprint=fp)
    x = torch.randint(0, 10, (3, 5))
    loaded = artifact.load(art, model())
    assert loaded[1].monarch_w1.dtype == torch.float32
    assert torch.equal(loaded(x), m(x))
    assert artifact.load(art, model(), dtype=torch.bfloat16)[1].monarch_w1.dtype == torch.bfloat16   # as asked
    rewrite(art, lambda s: s.__setitem__("1.monarch_w2", s["1.monarch_w2"][:, :, :1].contiguous()))
    fresh = model()
    with pytest.raises(artifact.ArtifactError, match=r"1.monarch_w2 must be \(4, 6, 4\)"):
        artifact.load(art, fresh)
    assert untouched(fresh)


def test_a_plan_quantize_would_refuse_is_refused_at_load(art):
    """An artifact's plan holding what no packed layer runs (W16 with quantized activations) was loaded as a
    plain float layer; it is refused as quantize refuses it."""
    plan = json.loads((art / "plan.json").read_text())
    plan["layers"]["1"] = {"w_bits": 16, "a_bits": 8}
    (art / "plan.json").write_text(json.dumps(plan))
    man = json.loads((art / "manifest.json").read_text())
    man["plan_sha256"] = artifact._sha256(art / "plan.json")
    (art / "manifest.json").write_text(json.dumps(man))
    m = model()
    with pytest.raises(ValueError, match="16-bit weights with quantized activations"):
        artifact.load(art, m)
    assert untouched(m)


def test_a_dit_config_that_changes_no_shape_is_checked(tmp_path):
    """num_heads changes no weight shape (the fingerprint cannot see it): the model's config is compared with
    the manifest's, and an edited manifest config fails its checksum."""
    from treeq_engine.models import DiT, DiTConfig

    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    m = DiT(cfg)
    plan = QuantPlan({"blocks.0.attn.qkv": LayerConfig(4, 8)})
    fp = artifact.fingerprint(m, plan)
    quantize(m, plan)
    desc = {"arch": "dit", "config": cfg.to_dict()}
    art = artifact.save(m, plan, tmp_path / "art", fp_fingerprint=fp, model_config=desc)
    artifact.load(art, DiT(cfg))
    other = DiT(cfg.replace(num_heads=4))
    with pytest.raises(artifact.ArtifactError, match=r"made for another model: its config differs in \['num_heads'\]"):
        artifact.load(art, other)
    assert untouched(other)
    man = json.loads((art / "manifest.json").read_text())
    man["model_config"]["config"]["num_heads"] = 4
    (art / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(artifact.ArtifactError, match="model_config was changed"):
        artifact.read_manifest(art)
    man["model_config"] = [1]
    (art / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(artifact.ArtifactError, match="model_config must be a JSON object, got list"):
        artifact.read_manifest(art)
