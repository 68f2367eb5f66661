"""The GPU runbook script parses, names its stages, and refers only to scripts and flags that exist (its steps
themselves need a GPU)."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_session.sh"


def test_gpu_session_parses_and_rejects_unknown_stages(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "warp-drive"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "unknown stage warp-drive" in r.stderr
    assert (tmp_path / "summary.tsv").read_text().startswith("step\trc\tseconds")


def test_gpu_session_steps_exist():
    text = SCRIPT.read_text()
    for script in set(re.findall(r"(benchmarks/\w+\.py|tools/\w+\.sh)", text)):
        assert (ROOT / script).exists(), script
    for script, flag in re.findall(r"(benchmarks/\w+\.py) (--[\w-]+)", text):
        assert flag in (ROOT / script).read_text(), (script, flag)
