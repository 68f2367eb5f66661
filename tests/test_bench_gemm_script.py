"""benchmarks/bench_gemm.py degrades cleanly without a GPU and writes only its own section of RESULTS.md."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gemm.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_is_a_clear_message(tmp_path):
    out = tmp_path / "R.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--results", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "needs a GPU" in r.stdout and not r.stderr.strip()
    assert not out.exists()


def test_predictions_replace_only_their_section(tmp_path):
    out = tmp_path / "R.md"
    out.write_text("# Benchmark results\n\nkeep me\n")
    for _ in range(2):  # idempotent: the second run replaces the first section
        r = subprocess.run([sys.executable, str(SCRIPT), "--predict", "--results", str(out)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.count("bench_gemm:predictions:begin") == 1 and "keep me" in text
    assert "| 8192 |" in text and "fc2: K = 4608, N = 1152" in text
