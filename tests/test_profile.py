"""`treeq profile` writes a well-formed latency table (CPU timings: the pipeline, not the numbers)."""
import json

from treeq_engine.cli import main


def test_profile_table(tmp_path):
    out = tmp_path / "lut.json"
    assert main(["profile", "--config", "DiT-test", "--device", "cpu", "--reps", "1", "--tokens", "16,32",
                 "--formats", "W16A16,W4A8,W3A3", "--branch", "monarch:4:1", "--out", str(out)]) == 0
    lut = json.loads(out.read_text())
    assert lut["schema"] == "treeq-latency-lut" and lut["version"] == 1 and lut["backend"] == "reference"
    shapes = {(e["k"], e["n"]) for e in lut["entries"]}
    assert shapes == {(32, 96), (32, 32), (32, 128), (128, 32), (32, 192), (256, 32), (32, 64)}
    keys = {(e["k"], e["n"], e["tokens"], e["w_bits"], e["a_bits"], bool(e["branch"])) for e in lut["entries"]}
    assert len(keys) == len(lut["entries"])  # no duplicates
    assert all(e["us"] > 0 for e in lut["entries"])
    assert not any(e["w_bits"] == 16 and e["branch"] for e in lut["entries"])
