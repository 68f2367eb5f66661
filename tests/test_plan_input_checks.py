"""A plan file that is wrong in any of the ways a review tried is a PlanError naming what, not an AttributeError
later or a silent reading (found by a bad-input review)."""
import json

import pytest

from cli_refusal import refused
from treeq_engine.plan import LayerConfig, PlanError, QuantPlan
from treeq_engine.cli import main


def plan_text(**changes):
    d = {"schema": "treeq-plan", "version": 1, "model": "m", "meta": {},
         "layers": {"a": {"w_bits": 4, "a_bits": 8}, "b": {"w_bits": 8, "a_bits": 8}}}
    d.update(changes)
    return json.dumps(d)


def test_a_good_plan_reads_back():
    plan = QuantPlan.from_json(plan_text())
    assert plan.layers["a"] == LayerConfig(4, 8) and QuantPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("layer, match", [
    ({"w_bits": 4, "a_bits": 8, "branch": "monarch"}, "branch must be an object"),
    ({"w_bits": 4, "a_bits": 8, "branch": 5}, "branch must be an object"),
    ({"w_bits": 4, "a_bits": 8, "branch": {"kind": "monarch", "size": 3}}, r"branch: unknown field\(s\) \['size'\]"),
    ({"w_bits": 4, "a_bits": 8, "w_clip": "0.5"}, "w_clip must be a number"),
    ({"w_bits": 4, "a_bits": 8, "a_clip": True}, "a_clip must be a number"),
    ({"w_bits": 4, "a_bits": 8, "w_symmetric": 1}, "w_symmetric must be true or false"),
])
def test_malformed_layers(layer, match):
    with pytest.raises(PlanError, match=match):
        QuantPlan.from_json(plan_text(layers={"a": layer}))


@pytest.mark.parametrize("changes, match", [
    ({"version": True}, "plan version True is not supported"),
    ({"version": 1.0}, "plan version 1.0 is not supported"),
    ({"meta": [1, 2]}, "'meta' must be an object"),
    ({"model": 7}, "'model' must be a string"),
])
def test_malformed_plan_fields(changes, match):
    with pytest.raises(PlanError, match=match):
        QuantPlan.from_json(plan_text(**changes))


def test_layer_names_must_be_strings():
    """``QuantPlan.uniform`` takes names; handed a model it iterates its children: a PlanError saying so, not an
    AttributeError from the validation's name matching later."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(PlanError, match="layer names must be the model's module names .* got a Linear"):
        QuantPlan.uniform(model, 4, 8)
    with pytest.raises(PlanError, match="got a int"):
        QuantPlan({3: LayerConfig(4, 8)})


def test_duplicate_keys_deep_nesting_and_bytes(tmp_path):
    text = plan_text().replace('"b": {"w_bits": 8', '"a": {"w_bits": 8')   # layer "a" configured twice
    with pytest.raises(PlanError, match="key 'a' appears twice"):
        QuantPlan.from_json(text)
    with pytest.raises(PlanError, match="nested too deeply"):
        QuantPlan.from_json("[" * 100000 + "]" * 100000)
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(PlanError, match="not UTF-8"):
        QuantPlan.load(path)
    path.write_text(plan_text(version=2))
    with pytest.raises(PlanError, match=f"{path}: plan version 2"):   # the file is named
        QuantPlan.load(path)
    assert LayerConfig(4, 8, w_clip=1).w_clip == 1.0 and isinstance(LayerConfig(4, 8, w_clip=1).w_clip, float)


def test_a_searched_plan_refuses_another_model():
    """A searched plan records its layers' shapes; applying it to a model whose same-named linears have other
    shapes (another DiT size) is an error, not a note about unplanned layers."""
    import torch

    from treeq_engine.search.space import SearchSpace

    def net(hidden):
        return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Linear(hidden, 4))

    model = net(16)
    space = SearchSpace.build(model, [torch.randn(2, 8)], include=lambda n: True)
    plan = QuantPlan.from_json(space.plan(space.uniform(space.candidates[0])).to_json())
    assert plan.meta["layer_shapes"] == {"0": [8, 16], "1": [16, 4]}
    plan.validate(model)
    with pytest.raises(PlanError, match=r"made for another model: its layer '0' is K x N = 8 x 16, this model's is "
                                        r"8 x 12"):
        plan.validate(net(12))
    with pytest.raises(PlanError, match="not a regular expression"):
        SearchSpace.build(model, [torch.randn(2, 8)], include="[")
    for bad in (5, None, [8], [8, "16"], [True, 16]):   # an edited meta: a PlanError, not a TypeError/IndexError
        d = plan.to_dict()
        d["meta"]["layer_shapes"]["0"] = bad
        with pytest.raises(PlanError, match=r"layer_shapes\['0'\] must be \[K, N\] \(two integers\)"):
            QuantPlan.from_dict(d).validate(model)
    d = plan.to_dict()
    d["meta"]["layer_shapes"] = [[8, 16]]
    with pytest.raises(PlanError, match="layer_shapes must map layer names to"):
        QuantPlan.from_dict(d).validate(model)


def test_directories_and_files_in_each_others_place(tmp_path):
    """A folder where a plan file is expected, and a file where a ptq/peft folder is expected, are named as such."""
    with pytest.raises(PlanError, match="is a directory; a plan is a JSON file"):
        QuantPlan.load(tmp_path)
    f = tmp_path / "plan.json"
    f.write_text(plan_text())
    refused("expected a `treeq ptq` output directory .*got a file",
            ["peft", "--ptq", str(f), "--out", str(tmp_path / "p")])
    refused("expected a `treeq ptq` output directory; got a file",
            ["quantize", "--ptq", str(f), "--out", str(tmp_path / "q")])
    art = tmp_path / "art"   # another command's output: named as what it is
    assert main(["quantize", "--uniform", "W8A8", "--out", str(art)]) == 0
    for argv in (["peft", "--ptq", str(art), "--out", str(tmp_path / "p")],
                 ["quantize", "--ptq", str(art), "--out", str(tmp_path / "q")]):
        refused("holds no ptq.json: it is an artifact of `treeq quantize`", argv)
