import math

import numpy as np
import pytest
import torch

from treeq_engine.models.dit import (DIT_CONFIGS, DiT, DiTConfig, dit_config, sincos_pos_embed_2d,
                                     timestep_embedding)


def official_keys(depth: int) -> set[str]:
    """The facebookresearch DiT state-dict names, written out from the reference's module tree."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    for i in (0, 2):
        keys |= {f"t_embedder.mlp.{i}.weight", f"t_embedder.mlp.{i}.bias"}
    for b in range(depth):
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{b}.{lin}.weight", f"blocks.{b}.{lin}.bias"}
    for lin in ("linear", "adaLN_modulation.1"):
        keys |= {f"final_layer.{lin}.weight", f"final_layer.{lin}.bias"}
    return keys


def random_weights(model: DiT, gen: torch.Generator, std: float = 0.2) -> DiT:
    """Overwrite every trainable parameter (the reference zero-inits adaLN and output, which would hide bugs)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def test_state_dict_names_and_shapes_are_the_reference():
    cfg = dit_config("DiT-test")
    sd = DiT(cfg).state_dict()
    assert set(sd) == official_keys(cfg.depth)
    d, p = cfg.hidden_size, cfg.patch_size
    assert sd["x_embedder.proj.weight"].shape == (d, cfg.in_channels, p, p)
    assert sd["pos_embed"].shape == (1, cfg.num_tokens, d)
    assert sd["y_embedder.embedding_table.weight"].shape == (cfg.num_classes + 1, d)
    assert sd["t_embedder.mlp.0.weight"].shape == (d, 256)
    assert sd["blocks.1.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["blocks.1.mlp.fc1.weight"].shape == (4 * d, d)
    assert sd["blocks.1.mlp.fc2.weight"].shape == (d, 4 * d)
    assert sd["blocks.1.adaLN_modulation.1.weight"].shape == (6 * d, d)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2 * d, d)
    assert sd["final_layer.linear.weight"].shape == (p * p * 2 * cfg.in_channels, d)


def test_registry_matches_the_paper():
    assert len([n for n in DIT_CONFIGS if n.count("/")]) == 12
    xl = DIT_CONFIGS["DiT-XL/2"]
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size, xl.input_size) == (28, 1152, 16, 2, 32)
    assert (DIT_CONFIGS["DiT-S/8"].depth, DIT_CONFIGS["DiT-S/8"].hidden_size) == (12, 384)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in DiT(xl).parameters())
    assert abs(n_params / 1e6 - 675) < 1, n_params  # DiT-XL/2: 675M parameters (Peebles & Xie, Table 1)
    with pytest.raises(KeyError, match="unknown DiT config"):
        dit_config("DiT-M/2")


@pytest.mark.parametrize("kw, msg", [(dict(input_size=10, patch_size=4), "multiple of patch_size"),
                                     (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
                                     (dict(depth=0), "depth must be a positive int"),
                                     (dict(class_dropout_prob=1.0), "class_dropout_prob"),
                                     (dict(cfg_channels=9), "cfg_channels")])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DiTConfig(**kw)


def test_reference_init_gives_zero_output(gen):
    model = DiT(dit_config("DiT-test")).eval()
    out = model(torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0  # adaLN-Zero and the zeroed output layer


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    emb = timestep_embedding(t, 7)
    half = 3
    freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
    for r, tv in enumerate(t.tolist()):
        want = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs] + [0.0]
        torch.testing.assert_close(emb[r], torch.tensor(want), atol=2e-4, rtol=0)


def test_pos_embed_matches_mae_formula():
    dim, grid = 16, 3
    pe = sincos_pos_embed_2d(dim, grid).numpy()

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid), np.arange(grid))  # MAE: meshgrid(w, h), 'xy' indexing
    want = np.concatenate([one_d(dim // 2, gw.reshape(-1)), one_d(dim // 2, gh.reshape(-1))], axis=1)
    np.testing.assert_allclose(pe, want, atol=1e-6)
    model = DiT(dit_config("DiT-test"))
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(32, 4))


def naive_forward(model: DiT, x, t, y):
    """The DiT equations spelled out with explicit attention and patch reassembly."""
    cfg = model.config
    p, g, d, nh = cfg.patch_size, cfg.input_size // cfg.patch_size, cfg.hidden_size, cfg.num_heads
    n = x.shape[0]
    patches = x.reshape(n, cfg.in_channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    w = model.x_embedder.proj.weight.reshape(d, -1)
    h = patches @ w.T + model.x_embedder.proj.bias + model.pos_embed
    temb = model.t_embedder.mlp(timestep_embedding(t, 256))
    c = temb + model.y_embedder.embedding_table.weight[y]

    def ln(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)

    def lin(m, v):
        return v @ m.weight.T + m.bias

    for blk in model.blocks:
        mod = lin(blk.adaLN_modulation[1], torch.nn.functional.silu(c))
        s1, sc1, g1, s2, sc2, g2 = mod.chunk(6, dim=1)
        a = ln(h) * (1 + sc1[:, None]) + s1[:, None]
        qkv = lin(blk.attn.qkv, a).reshape(n, g * g, 3, nh, d // nh)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // nh), dim=-1) @ v
        h = h + g1[:, None] * lin(blk.attn.proj, att.transpose(1, 2).reshape(n, g * g, d))
        m = ln(h) * (1 + sc2[:, None]) + s2[:, None]
        h = h + g2[:, None] * lin(blk.mlp.fc2, torch.nn.functional.gelu(lin(blk.mlp.fc1, m), approximate="tanh"))
    fl = model.final_layer
    sh, sc = lin(fl.adaLN_modulation[1], torch.nn.functional.silu(c)).chunk(2, dim=1)
    out = lin(fl.linear, ln(h) * (1 + sc[:, None]) + sh[:, None])  # (N, T, p·p·C_out), features (p, p, C)
    co = cfg.out_channels
    img = torch.zeros(n, co, g * p, g * p)
    for i in range(g):
        for j in range(g):
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = out[:, i * g + j].reshape(n, p, p, co).permute(0, 3, 1, 2)
    return img


@pytest.mark.parametrize("name, overrides", [("DiT-test", {}), ("DiT-test-1ch", dict(patch_size=4, num_heads=4)),
                                             ("DiT-test", dict(input_size=6, patch_size=3, hidden_size=24, depth=3,
                                                               num_heads=3, mlp_ratio=2.0))])
def test_forward_matches_the_equations(gen, name, overrides):
    model = random_weights(DiT(dit_config(name, **overrides)), gen)
    cfg = model.config
    x = torch.randn(5, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.tensor([0, 3, 250, 777, 999])
    y = torch.tensor([0, 9, 10, 4, 2])  # 10 is the null class
    with torch.no_grad():
        out = model(x, t, y)
        torch.testing.assert_close(out, naive_forward(model, x, t, y), rtol=1e-4, atol=1e-4)
        # the decomposed forward is exactly the composition
        h, c = model.embed(x, t, y)
        for blk in model.blocks:
            h = blk(h, c)
        assert torch.equal(model.final(h, c), out)


def test_forward_with_cfg_guides_exactly_the_eps_channels(gen):
    for name, guided in [("DiT-test", 3), ("DiT-test-1ch", 1)]:
        model = random_weights(DiT(dit_config(name)), gen)
        cfg = model.config
        assert cfg.guided_channels == guided  # reference: 3 of 4 latent channels; 1-channel: only eps
        x = torch.randn(3, cfg.in_channels, 8, 8, generator=gen)
        t = torch.tensor([5, 500, 900])
        y = torch.tensor([1, 2, 3])
        null = torch.full_like(y, model.null_class)
        with torch.no_grad():
            cond, uncond = model(x, t, y), model(x, t, null)
            out = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null]), 4.0)
        mixed = uncond[:, :guided] + 4.0 * (cond[:, :guided] - uncond[:, :guided])
        torch.testing.assert_close(out[:3, :guided], mixed, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[3:, :guided], mixed, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[:3, guided:], cond[:, guided:], rtol=1e-5, atol=1e-5)  # unguided rest
        torch.testing.assert_close(out[3:, guided:], uncond[:, guided:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x, t, y, 2.0)


def test_label_dropout_and_input_errors(gen):
    model = random_weights(DiT(dit_config("DiT-test", class_dropout_prob=0.5)), gen)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([1, 2, 3, 4])
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1, 0]))
        manual = model(x, t, torch.tensor([10, 2, 10, 4]))
        assert torch.equal(forced, manual)
        torch.manual_seed(0)
        emb = model.y_embedder(torch.ones(4000, dtype=torch.long), train=True)
        null_rows = (emb == model.y_embedder.embedding_table.weight[10]).all(1).float().mean()
        assert 0.45 < null_rows < 0.55  # training replaces labels by the null class with p = 0.5
        assert torch.equal(model.y_embedder(y, train=False), model.y_embedder.embedding_table.weight[y])
    with pytest.raises(ValueError, match=r"DiT input must be \(N, 4, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), t[:2], y[:2])
    with pytest.raises(ValueError, match="t and y must be"):
        model(x, t[:3], y)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\]"):
        model(x, t, torch.tensor([1, 2, 11, 0]))
    with pytest.raises(TypeError, match="int64/int32"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="no null class"):
        DiT(dit_config("DiT-test", class_dropout_prob=0.0)).null_class
