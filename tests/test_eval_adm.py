"""The ADM-suite path on synthetic data and a tiny synthetic feature network (never real Inception weights)."""
import math

import numpy as np
import pytest
import torch

from treeq_engine.eval.adm import (InceptionFeatures, adm_metrics, inception_score, load_reference_batch,
                                   reference_stats, to_uint8_images)
from treeq_engine.eval.metrics import feature_stats, frechet_distance


class TinyNet(torch.nn.Module):
    """A stand-in 'Inception': uint8 (N, H, W, 3) -> pool (N, 8), spatial (N, 12), logits (N, 5)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=g))
        self.head = torch.nn.Parameter(torch.randn(5, 8, generator=g))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        h = torch.relu(torch.nn.functional.conv2d(x, self.conv, padding=1))
        pool = h.mean((2, 3))
        spatial = torch.nn.functional.adaptive_avg_pool2d(h[:, :3], 2).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.head.T}


def images(seed: int, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def test_torchscript_extractor_and_reference_batch(tmp_path):
    ref_imgs = images(0)
    with pytest.warns(DeprecationWarning):
        torch.jit.script(TinyNet()).save(str(tmp_path / "net.pt"))
    exported = torch.export.export(TinyNet(), (torch.from_numpy(images(5, 7)),),
                                   dynamic_shapes=({0: torch.export.Dim("n", min=1, max=1024)},))
    torch.export.save(exported, str(tmp_path / "net.pt2"))
    scripted = InceptionFeatures.from_file(tmp_path / "net.pt", batch_size=7, trusted=True)
    feats = InceptionFeatures.from_file(tmp_path / "net.pt2", batch_size=7, trusted=True)
    f_scripted = scripted(ref_imgs)
    f = feats(ref_imgs)
    assert f["pool"].shape == (40, 8) and f["spatial"].shape == (40, 12) and f["logits"].shape == (40, 5)
    with torch.no_grad():
        direct = TinyNet()(torch.from_numpy(ref_imgs))["pool"].double().numpy()
    np.testing.assert_allclose(f["pool"], direct, rtol=1e-5, atol=1e-6)  # batching changes nothing
    for k in f:
        np.testing.assert_allclose(f_scripted[k], f[k], rtol=1e-5, atol=1e-6)
    # an ADM-style reference .npz with precomputed statistics
    st = reference_stats(f)
    np.savez(tmp_path / "ref_stats.npz", mu=st.mu, sigma=st.sigma, mu_s=st.mu_s, sigma_s=st.sigma_s)
    ref = load_reference_batch(tmp_path / "ref_stats.npz")
    same = adm_metrics(ref_imgs, ref, feats)
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    other = adm_metrics(images(1), ref, feats)
    f1 = feats(images(1))
    assert other["fid"] == pytest.approx(frechet_distance(*feature_stats(f1["pool"]), st.mu, st.sigma))
    assert other["sfid"] == pytest.approx(frechet_distance(*feature_stats(f1["spatial"]), st.mu_s, st.sigma_s))
    assert other["inception_score"] == pytest.approx(inception_score(f1["logits"], logits=True))
    # a reference holding only images is run through the network
    np.savez(tmp_path / "ref_imgs.npz", arr_0=ref_imgs)
    from_imgs = load_reference_batch(tmp_path / "ref_imgs.npz", feats)
    np.testing.assert_allclose(from_imgs.sigma, st.sigma)


def test_inception_score():
    k = 5
    assert inception_score(np.full((10, k), 1 / k)) == pytest.approx(1.0)  # no confidence
    assert inception_score(np.eye(k)[np.arange(50) % k]) == pytest.approx(k)  # confident and diverse
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(30, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.mean([math.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), 1)))
                    for part in (p[:10], p[10:20], p[20:])])
    assert inception_score(logits, split_size=10, logits=True) == pytest.approx(want)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        InceptionFeatures.from_file(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        InceptionFeatures.from_file(tmp_path / "junk.pt", trusted=True)
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a torch.export program"):
        InceptionFeatures.from_file(tmp_path / "junk.pt2", trusted=True)
    feats = InceptionFeatures(lambda x: {"pool": x.float().flatten(1), "extra": x})
    with pytest.raises(ValueError, match="keys"):
        feats(images(0, 4))
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        InceptionFeatures(lambda x: x)(images(0, 4).astype(np.float32))
    np.savez(tmp_path / "odd.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="'mu'/'sigma' or 'arr_0'"):
        load_reference_batch(tmp_path / "odd.npz")
    np.savez(tmp_path / "imgs.npz", arr_0=images(0, 4))
    with pytest.raises(ValueError, match="pass the feature network"):
        load_reference_batch(tmp_path / "imgs.npz")


def test_to_uint8_images_as_dit_sample_ddp():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0]).reshape(1, 1, 2, 3)
    out = to_uint8_images(x)
    assert out.shape == (1, 2, 3, 3) and out.dtype == np.uint8
    want = np.clip(127.5 * x.numpy().reshape(-1) + 128.0, 0, 255).astype(np.uint8)
    assert (out[0, :, :, 0].reshape(-1) == want).all() and (out[..., 0] == out[..., 2]).all()
