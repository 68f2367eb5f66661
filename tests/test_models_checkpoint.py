import pytest
import torch

from test_models_dit import official_keys, random_weights
from treeq_engine.models.checkpoint import (CheckpointError, infer_config, load_dit_checkpoint, read_state_dict,
                                            save_dit_safetensors)
from treeq_engine.models.dit import DIT_CONFIGS, DiT, dit_config


def official_state_dict(cfg, gen) -> dict[str, torch.Tensor]:
    """Random tensors under the official names, shaped from the config by the reference's formulas."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    shapes = {"pos_embed": (1, cfg.num_tokens, d), "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
              "y_embedder.embedding_table.weight": (cfg.num_classes + 1, d),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
              "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
              "final_layer.linear.weight": (p * p * cfg.out_channels, d), "final_layer.linear.bias": (p * p * cfg.out_channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    h = int(d * cfg.mlp_ratio)
    for b in range(cfg.depth):
        for lin, (o, i) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (h, d), "mlp.fc2": (d, h),
                            "adaLN_modulation.1": (6 * d, d)}.items():
            shapes[f"blocks.{b}.{lin}.weight"] = (o, i)
            shapes[f"blocks.{b}.{lin}.bias"] = (o,)
    assert set(shapes) == official_keys(cfg.depth)
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}


def test_official_names_round_trip(tmp_path, gen):
    cfg = dit_config("DiT-test")
    sd = official_state_dict(cfg, gen)
    torch.save(sd, tmp_path / "dit.pt")
    model = load_dit_checkpoint(tmp_path / "dit.pt", cfg)
    back = model.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert not model.training and not model.pos_embed.requires_grad
    # config inferred from the shapes (the head count of a non-reference width is given)
    inferred = load_dit_checkpoint(tmp_path / "dit.pt", num_heads=2)
    assert inferred.config == cfg
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 700]), torch.tensor([0, 10])
    with torch.no_grad():
        assert torch.equal(inferred(x, t, y), model(x, t, y))


def test_training_checkpoint_uses_ema_and_safetensors(tmp_path, gen):
    cfg = dit_config("DiT-test-1ch")
    model, ema = random_weights(DiT(cfg), gen), random_weights(DiT(cfg), gen)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}}, "args": {"lr": 1e-4}},
               tmp_path / "0100000.pt")
    loaded = load_dit_checkpoint(tmp_path / "0100000.pt", cfg)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    assert all(torch.equal(v, model.state_dict()[k])
               for k, v in load_dit_checkpoint(tmp_path / "ddp.pt", cfg).state_dict().items())
    save_dit_safetensors(model, tmp_path / "m.safetensors")
    sd = read_state_dict(tmp_path / "m.safetensors")
    assert set(sd) == official_keys(cfg.depth)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_infer_reference_configs_from_shapes():
    for name in ("DiT-XL/2", "DiT-B/4", "DiT-S/8"):
        with torch.device("meta"):
            sd = DiT(DIT_CONFIGS[name]).state_dict()  # shapes only
        assert infer_config(sd) == DIT_CONFIGS[name]
    with torch.device("meta"):
        sd = DiT(DIT_CONFIGS["DiT-XL/2"].replace(input_size=64)).state_dict()
    assert infer_config(sd).input_size == 64  # 512 px
    with pytest.raises(CheckpointError, match="cannot infer num_heads"):
        infer_config(DiT(dit_config("DiT-test")).state_dict())


def test_bad_files_are_clear_errors(tmp_path, gen):
    cfg = dit_config("DiT-test")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit_checkpoint(tmp_path / "nope.pt", cfg)
    torch.save(DiT(cfg).state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dit_checkpoint(tmp_path / "cut.pt", cfg)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cut.pt|junk.pt"):
        load_dit_checkpoint(tmp_path / "junk.pt", cfg)
    torch.save({"weights": DiT(cfg).state_dict(), "hook": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_dit_checkpoint(tmp_path / "evil.pt", cfg)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_dit_checkpoint(tmp_path / "list.pt", cfg)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_dit_checkpoint(tmp_path / "bad.safetensors", cfg)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_mismatched_state_dict_names_every_problem(tmp_path, gen):
    cfg = dit_config("DiT-test")
    sd = official_state_dict(cfg, gen)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.1.mlp.fc3.weight"] = torch.zeros(1)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(95, 32)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_dit_checkpoint(tmp_path / "bad.pt", cfg)
    msg = str(e.value)
    assert "missing keys (1): ['blocks.1.mlp.fc2.bias']" in msg
    assert "unexpected keys (1): ['blocks.1.mlp.fc3.weight']" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (95, 32) vs model (96, 32)" in msg
    # a checkpoint of another size is a shape error, not a silent partial load
    torch.save(DiT(dit_config("DiT-test", hidden_size=64)).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_dit_checkpoint(tmp_path / "wide.pt", cfg)
    with pytest.raises(CheckpointError, match="unknown DiT config"):
        load_dit_checkpoint(tmp_path / "wide.pt", "DiT-Q/2")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is this a DiT checkpoint"):
        load_dit_checkpoint(tmp_path / "other.pt")
