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
    got = {row["variant"]: row for row in json.loads(rows.read_text())}
    assert {"bf16 eager", "TreeQ W8A8", "TreeQ W4A8", "TreeQ W4A4"} <= set(got)
    mixed = next(v for k, v in got.items() if k.startswith("TreeQ mixed"))
    assert abs(mixed["avg_w"] - 3.89) < 0.05 and abs(mixed["avg_a"] - 4.0) < 0.01  # on DiT-test's shapes too
    assert 0 < got["TreeQ W4A4"]["weight_ratio"] < 0.6  # per-channel scales weigh more at K = 32
