import json

import pytest
import torch
from PIL import Image

from cli_refusal import refused
from treeq_engine.cli import build_parser, main
from treeq_engine.demo import format_table, parse_config, pick_real, uniform_plan
from treeq_engine.models.digits import DIGITS_DIT
from treeq_engine.models.dit import DiT


def test_uniform_plan_puts_edges_at_w8a8():
    model = DiT(DIGITS_DIT)
    plan = uniform_plan(model, 3, 4)
    plan.validate(model)
    assert len(plan.layers) == 5 * DIGITS_DIT.depth + 4
    for name, cfg in plan.layers.items():
        edge = name.startswith(("t_embedder.", "final_layer."))
        assert (cfg.w_bits, cfg.a_bits) == ((8, 8) if edge else (3, 4)), name
    assert {n for n in plan.layers if n.startswith("blocks.0.")} == {
        f"blocks.0.{s}" for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")}


def test_parse_and_table():
    assert parse_config("w4a8") == (4, 8)
    with pytest.raises(ValueError, match="WxAy"):
        parse_config("int4")
    table = format_table([{"config": "FP", "eps_mse": 0.0, "frechet": 1.5, "accuracy": 0.97},
                          {"config": "W4A4", "eps_mse": 1e-3, "psnr": 20.123, "ssim": 0.9, "frechet": 3.0,
                           "accuracy": 0.9}])
    assert "| W4A4 | 1.000e-03 | 20.12 | 0.9000 | 3.00 | 90.0% |" in table and "| FP | 0.000e+00 | - | - |" in table


def test_pick_real_matches_labels():
    train_y = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    labels = torch.tensor([1, 1, 1, 1, 0, 2])
    idx = pick_real(train_y, labels, seed=0)
    assert torch.equal(train_y[idx], labels)
    assert len(set(idx[:3].tolist())) == 3  # without replacement until a class runs out


def test_demo_runs_end_to_end(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--samples", "12", "--steps", "3", "--configs", "W8A8,W3A3",
            "--cfg-scale", "1.5", "--no-progress"]
    threads = torch.get_num_threads()
    assert main(args) == 0
    assert torch.get_num_threads() == threads  # the demo's --threads does not leak
    out = capsys.readouterr().out
    assert "| W3A3 |" in out and "| real (train) |" in out
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["config"]: r for r in res["results"]}
    assert list(rows) == ["real (train)", "FP", "W8A8", "W3A3"]
    assert rows["FP"]["eps_mse"] == 0.0
    assert 0 < rows["W8A8"]["eps_mse"] < rows["W3A3"]["eps_mse"]  # fewer bits lose more
    assert rows["W8A8"]["psnr"] > rows["W3A3"]["psnr"]
    img = Image.open(tmp_path / "samples.png")
    assert img.size[1] == 3 * (16 * 3 + 2)  # FP, W8A8, W3A3 rows
    assert res["settings"]["samples"] == 12
    assert build_parser().parse_args(["demo"]).steps > 0


@pytest.mark.parametrize("configs, msg", [("W4A8,int4", "WxAy"), ("W5A8", "unsupported weight bit-width 5")])
def test_demo_rejects_bad_configs(tmp_path, configs, msg):
    refused(msg, ["demo", "--out", str(tmp_path), "--configs", configs])
