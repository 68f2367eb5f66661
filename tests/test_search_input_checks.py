"""Bad search inputs are refused with an error naming the file and the field: a TSS resume state, a latency table,
a calibration set."""
import copy
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import tinydit
from tinydit import eps, one_thread  # noqa: F401
from treeq_engine.plan import LayerConfig, PlanError
from treeq_engine.search import Budget, DiTRunner, Environment, Evaluator, LatencyTable, cost_model, tree_search
from treeq_engine.search.calibration import SCHEMA, VERSION, CalibrationConfig, CalibrationSet, load_or_collect
from treeq_engine.search.cli import random_dit

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the TSS resume state --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tinydit.setup(depth=2, d=16, tokens=4, seed=5, n=8)


def _evaluator(tiny):
    model = copy.deepcopy(tiny[0])
    return Evaluator(model, DiTRunner(model, output_fn=eps), tiny[2], tiny[1], Environment(LayerConfig(3, 8), 1.0),
                     batch=8, group=16)


class _Killed(Exception):
    pass


def _state_at(tiny, tmp_path, level):
    """The state file of a search killed after ``level`` (``None``: run to the end), and its search's arguments."""
    cost, b = cost_model(tiny[2], "w"), Budget.parse("W3")
    state = tmp_path / "state.json"

    def hook(lv):
        if lv == level:
            raise _Killed

    try:
        tree_search(_evaluator(tiny), cost, keep=6, budget=b, state_path=state, progress=False, on_level=hook)
    except _Killed:
        pass
    return state, cost, b


def _resume(tiny, state, cost, b):
    return tree_search(_evaluator(tiny), cost, keep=6, budget=b, state_path=state, resume=True, progress=False)


def _edit(state, fn):
    doc = json.loads(state.read_text())
    fn(doc)
    state.write_text(json.dumps(doc))


def _ragged(d):
    d["nodes"][0]["configs"][0].append(1)


def _over_budget(d):   # a cheaper cost written beside a dearer config
    d["nodes"][0]["cost"][0][0] /= 2


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d["nodes"].pop(), r"'nodes' must list the 5 nodes of level 1 over 10 leaves, got 4"),
    (lambda d: d["nodes"].pop(0), r"'nodes' must list the 5 nodes of level 1 over 10 leaves, got 4"),
    (lambda d: d.pop("nodes"), r"lacks \['nodes'\]"),
    (_ragged, r"nodes\[0\]\.configs must be integers of shape \(\d+, 2\), got ragged rows"),
    (lambda d: d["nodes"][1].update(lo=0), r"nodes\[1\] covers leaves \[0, 4\), expected \[2, 4\)"),
    (lambda d: d["nodes"][2].update(configs=[[0.5, 1]] * len(d["nodes"][2]["mse"])), r"nodes\[2\]\.configs must be "
                                                                                      r"integers"),
    (lambda d: d["nodes"][0]["configs"][0].__setitem__(0, 99), r"candidate indices outside \[0, 12\)"),
    (lambda d: d["nodes"][0].update(mse="x"), r"nodes\[0\]\.mse must be a non-empty list"),
    (_over_budget, r"nodes\[0\]\.cost does not match the cost table"),
    (lambda d: d.update(level=10 ** 9), r"'levels' must list one object per finished level \(1000000001\)"),
    (lambda d: d.update(level=5, levels=d["levels"] * 3), r"level 5 is past the root of a search over 10 leaves"),
    (lambda d: d.update(evaluations="12"), r"'evaluations' must be a non-negative integer"),
])
def test_an_incomplete_or_malformed_resume_state_is_refused(tiny, tmp_path, edit, msg):
    state, cost, b = _state_at(tiny, tmp_path, 1)
    _edit(state, edit)
    with pytest.raises(ValueError, match=msg) as e:
        _resume(tiny, state, cost, b)
    assert str(state) in str(e.value)


def test_a_finished_state_needs_its_front(tiny, tmp_path):
    state, cost, b = _state_at(tiny, tmp_path, None)
    assert len(_resume(tiny, state, cost, b).best(b, cost)[0]) == 10        # intact: resumes to the answer
    _edit(state, lambda d: d.update(front=None))
    with pytest.raises(ValueError, match="lacks its 'front'"):
        _resume(tiny, state, cost, b)


# -- the latency table -----------------------------------------------------------------------------
ENTRY = {"k": 64, "n": 64, "tokens": 8, "w_bits": 4, "a_bits": 4, "branch": None, "us": 5.0}


@pytest.mark.parametrize("entries, msg", [
    ([{**ENTRY, "k": 64.9}], r"entry 0: 'k' must be a positive integer, got 64.9"),
    ([{**ENTRY, "w_bits": 4.7}], r"entry 0: 'w_bits' must be a positive integer, got 4.7"),
    ([{**ENTRY, "a_bits": True}], r"'a_bits' must be a positive integer, got True"),
    ([{**ENTRY, "tokens": "8"}], r"'tokens' must be a positive integer, got '8'"),
    ([{**ENTRY, "n": 0}], r"'n' must be a positive integer, got 0"),
    ([ENTRY, {**ENTRY, "us": 7.0}], r"entry 1 times K=64, N=64, tokens=8, W4A4, branch=None at 7.0 us, but entry 0 "
                                    r"already does at 5.0 us"),
    ([[64, 64, 8]], r"entry 0 is malformed: expected an object"),
    ([3], r"entry 0 is malformed: expected an object"),
    ([{**ENTRY, "branch": "monarch"}], r"entry 0: branch must be null or an object with kind, blocks and rank"),
    ([{**ENTRY, "branch": {"kind": "monarch", "blocks": 4, "rank": 1, "size": 2}}], r"entry 0: branch .* is not a "
                                                                                    r"branch config"),
    ([{**ENTRY, "us": 0}], r"'us' must be a finite positive number, got 0"),
    ([{**ENTRY, "us": True}], r"'us' must be a finite positive number, got True"),
    ([{**ENTRY, "us": float("nan")}], r"'us' must be a finite positive number, got nan"),
    ([{**ENTRY, "us": 10 ** 400}], r"'us' must be a finite positive number"),
    ([{"k": 64}], r"entry 0 is malformed: it lacks \['n', 'tokens', 'w_bits', 'a_bits', 'us'\]"),
])
def test_a_malformed_latency_table_entry_is_refused(tmp_path, entries, msg):
    p = tmp_path / "lut.json"
    p.write_text(json.dumps({"schema": "treeq-latency-lut", "version": 1, "entries": entries}))
    with pytest.raises(PlanError, match=msg) as e:
        LatencyTable.load(p)
    assert str(p) in str(e.value)


def test_latency_table_keeps_exact_values_and_identical_repeats(tmp_path):
    p = tmp_path / "lut.json"
    entries = [{**ENTRY, "k": 64.0}, dict(ENTRY), {**ENTRY, "tokens": 16, "us": 9}]   # a repeat: the same timing
    p.write_text(json.dumps({"schema": "treeq-latency-lut", "version": 1, "entries": entries}))
    lut = LatencyTable.load(p)
    assert lut.lookup(64, 64, 8, 4, 4) == 5.0 and lut.lookup(64, 64, 12, 4, 4) == pytest.approx(7.0)


# -- the calibration set ---------------------------------------------------------------------------
def _calib_tensors(n=4):
    return {"x": torch.randn(n, 1, 8, 8), "t": torch.arange(n, dtype=torch.int64),
            "y": torch.tensor([0, 1, 2, 10][:n]), "w": torch.rand(n, dtype=torch.float64) + 0.1}


def _write_calib(path, meta='{"config": {}}', **tensors):
    save_file({**_calib_tensors(), **tensors}, str(path),
              metadata={"schema": SCHEMA, "version": str(VERSION), "meta": meta})


@pytest.mark.parametrize("change, msg", [
    ({"x": torch.zeros(4, 1, 8, 8, dtype=torch.int8)}, r"tensor 'x' must be torch.float32, got torch.int8"),
    ({"t": torch.arange(4).float()}, r"tensor 't' must be torch.int64, got torch.float32"),
    ({"y": torch.tensor([0, 1, -1, 3])}, r"tensor 'y' holds labels below 0: range \[-1, 3\]"),
    ({"w": torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64)}, r"tensor 'w' \(sampler weights\) "
                                                                              r"must be finite, non-negative"),
    ({"w": torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)}, r"'w' .* must be finite, non-negative"),
    ({"w": torch.zeros(4, dtype=torch.float64)}, r"'w' .* not all zero"),
    ({"x": torch.full((4, 1, 8, 8), float("inf"))}, r"tensor 'x' holds NaN or infinite values"),
    ({"t": torch.tensor([5, -1, 3, 0])}, r"tensor 't' holds negative timesteps"),
    ({"y": torch.arange(3)}, r"tensor 'y' must have shape \(4,\)"),
    ({"meta": "{bad"}, r"metadata 'meta' is not valid JSON"),
    ({"meta": "[1]"}, r"metadata 'meta' must be a JSON object, got list"),
])
def test_a_malformed_calibration_file_is_refused(tmp_path, change, msg):
    p = tmp_path / "calib.safetensors"
    _write_calib(p, **change)
    with pytest.raises(ValueError, match=msg) as e:
        CalibrationSet.load(p)
    assert str(p) in str(e.value)


def test_calibration_labels_are_checked_against_the_model_classes(tmp_path):
    p = tmp_path / "calib.safetensors"
    _write_calib(p, y=torch.tensor([0, 1, 5000, 10]))
    assert CalibrationSet.load(p).y.max() == 5000                  # no class count: only the sign is known
    with pytest.raises(ValueError, match=r"tensor 'y' holds labels below 0 or above 10 .*\[0, 5000\]"):
        CalibrationSet.load(p, num_classes=10)
    _write_calib(p, y=torch.tensor([0, 1, 9, 10]))                 # 10: the null class of guidance
    assert CalibrationSet.load(p, num_classes=10).y.tolist() == [0, 1, 9, 10]


@pytest.mark.parametrize("change", [{"meta": "[1]"}, {"y": torch.tensor([0, 1, 5000, 3])}])
def test_a_bad_cached_calibration_set_is_collected_again_with_a_warning(tmp_path, change):
    model = random_dit("DiT-test-1ch", seed=1)
    cfg = CalibrationConfig(trajectories=2, steps=2, timesteps=1, seed=3)
    first = load_or_collect(model, cfg, tmp_path)
    (cached,) = tmp_path.glob("calib-*.safetensors")
    _write_calib(cached, **change)
    with pytest.warns(UserWarning, match=rf"calibration file {re.escape(str(cached))}.*collecting .* again"):
        again = load_or_collect(model, cfg, tmp_path)
    torch.testing.assert_close(again.x, first.x, rtol=0, atol=0)
    assert again.y.max() < model.config.num_classes and isinstance(again.meta, dict)
