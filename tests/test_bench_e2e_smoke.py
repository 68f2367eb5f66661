"""The end-to-end benchmark's code paths on CPU (tiny config; no timing is asserted or recorded)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_e2e_smoke(tmp_path):
    rows = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke", "--json", str(rows)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(rows.read_text())
    got = {row["variant"]: row for row in data}   # each variant's last row: batch 2
    # batch 1 too: a fused block whose proj keeps the separate residual (the A/B) once failed there
    assert all({r["batch"] for r in data if r["variant"] == v} == {1, 2} for v in got)
    assert {"bf16 eager", "TreeQ W8A8", "TreeQ W4A8", "TreeQ W4A4"} <= set(got)
    mixed = next(v for k, v in got.items() if k.startswith("TreeQ mixed"))
    assert abs(mixed["avg_w"] - 3.89) < 0.05 and abs(mixed["avg_a"] - 4.0) < 0.01  # on DiT-test's shapes too
    assert 0 < got["TreeQ W4A4"]["weight_ratio"] < 0.6  # per-channel scales weigh more at K = 32
    # every variant's output against the bf16 eager one on the same seeded inputs
    assert got["bf16 eager"]["rel_err"] == 0.0
    assert all(0 < r["rel_err"] < 1 for k, r in got.items() if k.startswith("TreeQ"))
    ab = got["TreeQ W4A4, gated residual not fused (A/B)"]["rel_err"]
    assert abs(ab - got["TreeQ W4A4"]["rel_err"]) < 1e-3 * ab   # the fusion changes rounding only


def test_bench_e2e_predict_accounting():
    """--predict's Amdahl account on a tiny config: every plan's weight ratio from the packed modules, and per
    batch rest + linears = the recorded bf16 time, with the int8-peak bound above the fused prediction."""
    import argparse
    import re

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_e2e

    text = bench_e2e.predict(argparse.Namespace(config="DiT-test"))
    plans = [ln for ln in text.splitlines() if re.match(r"\| (uniform|mixed)", ln)]
    assert len(plans) == 5
    ratio = {ln.split(" | ")[0][2:]: float(ln.split(" | ")[2].rstrip("×")) for ln in plans}
    assert ratio["uniform W4A4"] < ratio["uniform W8A8"]  # (DiT-test is so narrow that the branch outweighs W8)
    assert ratio["uniform W4A4"] < ratio["uniform W4A4 + GMB (default size, b·r = 32)"]
    for ln in (ln for ln in text.splitlines() if re.match(r"\| (1|8|32) \|", ln)):
        cells = ln.strip("| ").split(" | ")
        comp, lin, rest = map(float, cells[1:4])
        assert abs(lin + rest - comp) < 0.02
        fused, peak = (float(c.split(" (")[1].rstrip("×)")) for c in (cells[4], cells[6]))
        assert peak >= fused


def test_latency_budget_smoke(tmp_path):
    """profile -> search at a latency budget -> quantize -> measure, on CPU; the numbers are not judged, the
    bookkeeping is: the plan meets its budget by the table, and predicted = rest + the plan's table µs."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency_budget.py"), "--smoke", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((tmp_path / "record.json").read_text())
    assert (tmp_path / "lut.json").exists() and rec["leaves"] == 10
    low, high = rec["runs"]
    assert "infeasible" in low and "cheapest plan" in low["infeasible"] and "predicted_ms" not in low
    assert high["search_costs"]["us"] <= high["budget_us"]
    assert abs(high["plan_linears_us"]["searched"] - high["search_costs"]["us"]) <= 1e-9 * high["budget_us"]
    lin = high["plan_linears_us"]
    unfused = rec["bf16"]["rest_ms"] + (lin["searched"] + lin["fixed"]) / 1e3
    assert abs(high["predicted_unfused_ms"] - unfused) < 1e-9 and high["fused_blocks"] == 2
    assert 0 <= high["fused_residuals"] <= 4
    fold = (2 * rec["bf16"]["fusable_ms_per_block"] + high["fused_residuals"] * rec["bf16"]["fusable_ms_per_residual"]
            + high["shared_adaln_inputs"] * rec["bf16"]["fusable_ms_per_shared_adaln_input"])
    assert 0 <= high["shared_adaln_inputs"] <= 1
    assert abs(high["predicted_ms"] - (unfused - fold)) < 1e-9
    assert high["budget"] == "mid" and high["floor_us"] < high["budget_us"]
    assert high["measured_ms"] > 0 and 0 < high["weight_ratio"] < 1
    plan = json.loads((tmp_path / "search_mid" / "plan.json").read_text())
    assert plan["meta"]["budget"]["kind"] == "latency"


def test_bench_search_predict_counts_the_planned_work():
    """bench_search --predict lays out DiT-XL/2's search from the config alone: the same planned evaluations as
    the timing run on the real search space recorded (27,744), and a block's FLOPs counted by hand."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_search

    from treeq_engine.models import dit_config

    flops, elems, _ = bench_search.block_costs(dit_config("DiT-XL/2"))
    d, t = 1152, 256
    assert flops == 2 * t * (d * 3 * d + d * d + 2 * d * 4 * d) + 2 * d * 6 * d + 4 * t * t * d
    assert elems == t * 7 * d + d
    text = bench_search.predict(argparse.Namespace(config="DiT-XL/2", keep=16, group=16, samples=32))
    assert "27,744 candidate evaluations" in text
    assert text.count("min** |") == 2


def test_search_floor_agrees_with_the_dit_prediction():
    """benchmarks/search_floor.py counts FLOPs per segment on the meta device and lays out the search on the real
    (tied) space: on diffusers' DiT-XL/2 it plans bench_search's 27,744 evaluations and its FLOP floor is the
    hand-counted one within 2 % (the hand count leaves out the embedders and head)."""
    import pytest

    pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_search
    import search_floor

    from treeq_engine.models import dit_config

    row = search_floor.measure("DiT-XL/2 256px", 256, 32, (16, 8), 16)
    assert row[16]["evaluations"] == 27_744 and row["leaves"] == 140 and row["tokens"] == 256
    cfg = dit_config("DiT-XL/2")
    leaf_segment = [b + 1 for b in range(cfg.depth) for _ in range(5)]
    levels = bench_search.planned_units(leaf_segment, cfg.depth + 2, 12, 16, 16)
    sample_blocks = sum(r * (s - 1) for lv in levels for r, s in lv) * 32
    hand = sample_blocks * bench_search.block_costs(cfg)[0] / bench_search.BF16_PEAK / 60
    assert abs(row[16]["floor_min"] / hand - 1) < 0.02
    assert row[8]["floor_min"] < row[16]["floor_min"] / 2   # K² products: a smaller K is much cheaper
    text = search_floor.render([("DiT-XL/2 256px", 256, row)], (16, 8), 16, 32)
    assert "| DiT-XL/2 256px | 256 px | 256 | 140 |" in text and text.count("min** |") == 2


def test_bench_mmdit_e2e_smoke(capsys):
    """benchmarks/bench_mmdit_e2e.py --smoke: a tiny Flux built, packed at W8A8 and W4A8 (blocks fused), every
    variant timed on the CPU and finite; the table renders (no numbers kept)."""
    import pytest

    pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_mmdit_e2e

    assert bench_mmdit_e2e.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["bf16", "W8A8", "W4A8"] and all(r["finite"] for r in rows)
    assert rows[2]["weight_gib"] < rows[0]["weight_gib"]
    assert "| W4A8 |" in out
    with pytest.raises(SystemExit, match="must include bf16"):
        bench_mmdit_e2e.main(["--smoke", "--variants", "W4A8"])
    assert bench_mmdit_e2e.main(["--smoke", "--model", "Wan2.1-T2V-1.3B"]) == 0   # a tiny Wan, blocks fused
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["bf16", "W8A8", "W4A8"] and all(r["finite"] for r in rows)
    assert "tiny Wan (smoke) at 5 frames of 48×32" in out
    assert rows[0]["fused_blocks"] == 0 and rows[1]["fused_blocks"] == 2 and rows[0]["rel_err_vs_bf16"] == 0
    assert 0 < rows[1]["rel_err_vs_bf16"] < 0.1
    assert bench_mmdit_e2e.main(["--smoke", "--model", "Qwen-Image"]) == 0   # a tiny Qwen-Image, blocks fused
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["fused_blocks"] for r in rows] == [0, 2, 2] and all(r["finite"] for r in rows)
    assert bench_mmdit_e2e.main(["--smoke", "--model", "Sana 1600M 1024px"]) == 0   # a tiny Sana, blocks fused
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["fused_blocks"] for r in rows] == [0, 2, 2] and all(r["finite"] for r in rows)
    assert 0 < rows[1]["rel_err_vs_bf16"] < 0.1
    assert bench_mmdit_e2e.main(["--smoke", "--model", "FLUX.2-dev"]) == 0   # a tiny FLUX.2, blocks fused
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["fused_blocks"] for r in rows] == [0, 3, 3] and all(r["finite"] for r in rows)
    assert 0 < rows[1]["rel_err_vs_bf16"] < 0.1
    with pytest.raises(SystemExit, match="--video must be F,H,W"):
        bench_mmdit_e2e.main(["--smoke", "--model", "Wan2.1-T2V-1.3B", "--video", "81,480"])


def test_bench_mmdit_e2e_refuses_bad_blocks():
    import pytest

    pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_mmdit_e2e

    with pytest.raises(SystemExit, match="--blocks is for the published models"):
        bench_mmdit_e2e.main(["--smoke", "--blocks", "1,1"])
