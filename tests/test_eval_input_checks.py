"""Bad input to the metrics (eval/metrics.py, eval/adm.py) and to DiT training (models/train.py) is an error that
names what is wrong, never a number that looks valid, and no file is loaded as code without trusted=True."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from test_eval_adm import TinyNet, images
from treeq_engine.eval.adm import (InceptionFeatures, ReferenceStats, adm_metrics, inception_score,
                                   load_reference_batch, to_uint8_images)
from treeq_engine.eval.metrics import compare_samples, feature_stats, frechet_distance, psnr
from treeq_engine.models.checkpoint import CheckpointError
from treeq_engine.models.diffusion import create_diffusion
from treeq_engine.models.dit import DiT, dit_config
from treeq_engine.models.train import STATE_FILE, TrainConfig, train_dit

NAN, INF = float("nan"), float("inf")


# -- compare_samples ----------------------------------------------------------------------------------------------

def test_compare_samples_rejects_non_finite_and_empty(gen):
    a = torch.rand(3, 1, 6, 6, generator=gen) * 2 - 1
    with pytest.raises(ValueError, match="samples contain NaN or Inf"):
        compare_samples(torch.full_like(a, NAN), torch.full_like(a, NAN))
    with pytest.raises(ValueError, match="samples contain NaN or Inf"):
        compare_samples(torch.full_like(a, INF), a)
    b = a.clone()
    b[0, 0, 0, 0] = NAN
    with pytest.raises(ValueError, match=r"ref_samples contain NaN or Inf \(1 of 108"):
        compare_samples(a, b)
    with pytest.raises(ValueError, match="no samples"):
        compare_samples(a[:0], a[:0])
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, a * 0.5, data_range=0)
    # unchanged for valid input: identical images are +inf, and they are left out of the mean of the others
    assert compare_samples(a, a)["psnr"] == math.inf
    c = a.clone()
    c[1:] += 0.1
    assert compare_samples(c, a)["psnr"] == pytest.approx(float(psnr(c[1:], a[1:]).mean()))


# -- Fréchet distance and reference statistics --------------------------------------------------------------------

def test_frechet_distance_checks_the_gaussians():
    mu, eye = np.zeros(3), np.eye(3)
    for sigma, msg in ((np.full((3, 3), NAN), "sigma contains NaN or Inf"),
                       (np.triu(np.ones((3, 3))), "not symmetric"),
                       (np.diag([1.0, -1.0, 1.0]), "not positive semi-definite")):
        with pytest.raises(ValueError, match=msg):
            frechet_distance(mu, sigma, mu, eye)
        with pytest.raises(ValueError, match="second Gaussian.*" + msg):
            frechet_distance(mu, eye, mu, sigma)
    with pytest.raises(ValueError, match="mu contains NaN"):
        frechet_distance(np.array([0.0, INF, 0.0]), eye, mu, eye)
    # rank-deficient covariances (fewer samples than dimensions), also stored in float32, stay accepted
    f = np.random.default_rng(0).normal(size=(5, 40))
    m, s = feature_stats(f)
    assert frechet_distance(m, s.astype(np.float32), m, s) == pytest.approx(0.0, abs=1e-4)


def test_reference_batch_statistics_are_checked(tmp_path):
    f = np.random.default_rng(0).normal(size=(30, 4))
    mu, sigma = feature_stats(f)
    bad = {"nan": (mu, np.full((4, 4), NAN), "contains NaN or Inf"),
           "asym": (mu, sigma + np.triu(np.ones((4, 4)), 1), "not symmetric"),
           "neg": (mu, -sigma, "not positive semi-definite"),
           "shape": (mu, sigma[:3, :3], r"mu \(D,\) and sigma \(D, D\)"),
           "notsquare": (mu, sigma[:, :3], r"mu \(D,\) and sigma \(D, D\)")}
    for name, (m, s, msg) in bad.items():
        np.savez(tmp_path / f"{name}.npz", mu=m, sigma=s)
        with pytest.raises(ValueError, match=f"{name}.npz: 'mu'/'sigma'.*{msg}"):
            load_reference_batch(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "spatial.npz", mu=mu, sigma=sigma, mu_s=mu, sigma_s=np.full((4, 4), INF))
    with pytest.raises(ValueError, match="'mu_s'/'sigma_s'.*NaN or Inf"):
        load_reference_batch(tmp_path / "spatial.npz")
    np.savez(tmp_path / "half.npz", mu=mu, sigma=sigma, mu_s=mu)
    with pytest.raises(ValueError, match="only one of 'mu_s'/'sigma_s'"):
        load_reference_batch(tmp_path / "half.npz")
    np.savez(tmp_path / "good.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    ref = load_reference_batch(tmp_path / "good.npz")
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-6)


# -- the ADM suite ------------------------------------------------------------------------------------------------

def test_to_uint8_images_rejects_non_finite():
    x = torch.zeros(2, 3, 4, 4)
    for v in (NAN, INF, -INF):
        y = x.clone()
        y[1, 2, 3, 3] = v
        with pytest.raises(ValueError, match=r"NaN or Inf \(1 of 96"):
            to_uint8_images(y)


def test_inception_score_checks_its_input():
    with pytest.raises(ValueError, match="probabilities contain NaN"):
        inception_score(np.full((4, 3), NAN))
    with pytest.raises(ValueError, match="non-negative"):
        inception_score(np.array([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="logits=True"):  # logits passed as probabilities
        inception_score(np.random.default_rng(0).normal(size=(4, 3)) ** 2)
    with pytest.raises(ValueError, match="logits contain NaN or Inf"):
        inception_score(np.array([[INF, 0.0], [0.0, 1.0]]), logits=True)
    with pytest.raises(ValueError, match="N, classes >= 1"):
        inception_score(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="split_size"):
        inception_score(np.full((4, 2), 0.5), split_size=0)
    assert inception_score(np.full((4, 2), 0.5), split_size=np.int64(2)) == pytest.approx(1.0)


def test_feature_network_output_shape_is_checked():
    imgs = images(0, 5)
    with pytest.raises(ValueError, match=r"'pool' must be \(N, D\).*N = 5.*got shape \(1, 192\)"):
        InceptionFeatures(lambda x: x.float().flatten(1)[:1])(imgs)
    with pytest.raises(ValueError, match=r"'pool' must be \(N, D\).*got shape \(5,\)"):
        InceptionFeatures(lambda x: x.float().sum((1, 2, 3)))(imgs)
    with pytest.raises(ValueError, match=r"'logits' must be \(N, D\).*got shape \(2, 0\)"):
        InceptionFeatures(lambda x: (x.float().flatten(1), x.float().flatten(1), torch.zeros(x.shape[0], 0)),
                          batch_size=2)(imgs)
    with pytest.raises(TypeError, match="must be a tensor"):
        InceptionFeatures(lambda x: {"pool": x.float().flatten(1).numpy()})(imgs)
    with pytest.raises(ValueError, match="batch_size"):
        InceptionFeatures(lambda x: x, batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        InceptionFeatures(lambda x: x.float().flatten(1))(imgs[:0])
    # an (N, C, 1, 1) pool output (as Inception's pool_3) is flattened per image, as before
    out = InceptionFeatures(lambda x: x.float().mean((1, 2))[:, :, None, None], batch_size=2)(imgs)
    assert out["pool"].shape == (5, 3)


def test_adm_metrics_checks_counts_and_dimensions():
    feats = InceptionFeatures(TinyNet())
    mu, sigma = feature_stats(feats(images(0))["pool"])
    ref = ReferenceStats(mu, sigma)
    for n in (0, 1):
        with pytest.raises(ValueError, match=f"at least 2 images.*got {n}"):
            adm_metrics(images(1, n), ref, feats)
    with pytest.raises(ValueError, match="'pool' has 8 values per image but the reference's mean has 3"):
        adm_metrics(images(1), ReferenceStats(mu[:3], sigma[:3, :3]), feats)
    bad_sigma = sigma.copy()
    bad_sigma[0, 0] = -1.0
    with pytest.raises(ValueError, match="second Gaussian.*positive semi-definite"):
        adm_metrics(images(1), ReferenceStats(mu, bad_sigma), feats)
    with pytest.raises(TypeError, match="ReferenceStats"):
        adm_metrics(images(1), (mu, sigma), feats)


def test_network_files_load_only_when_trusted(tmp_path, monkeypatch):
    with pytest.warns(DeprecationWarning):
        torch.jit.script(TinyNet()).save(str(tmp_path / "net.pt"))
    exported = torch.export.export(TinyNet(), (torch.from_numpy(images(5, 7)),),
                                   dynamic_shapes=({0: torch.export.Dim("n", min=1, max=1024)},))
    torch.export.save(exported, str(tmp_path / "net.pt2"))
    want = TinyNet()(torch.from_numpy(images(0, 6)))["pool"].detach().double().numpy()
    for name in ("net.pt", "net.pt2"):
        np.testing.assert_allclose(InceptionFeatures.from_file(tmp_path / name, trusted=True)(images(0, 6))["pool"],
                                   want, rtol=1e-5, atol=1e-6)

    def must_not_load(*a, **k):
        raise AssertionError("an untrusted file reached a loader")

    monkeypatch.setattr(torch.jit, "load", must_not_load)
    monkeypatch.setattr(torch.export, "load", must_not_load)
    with pytest.raises(ValueError, match=r"net.pt: loading a TorchScript file can run code.*trusted=True"):
        InceptionFeatures.from_file(tmp_path / "net.pt")
    with pytest.raises(ValueError, match=r"net.pt2: loading a torch.export program \(.pt2\) can run code"):
        InceptionFeatures.from_file(tmp_path / "net.pt2", batch_size=4)
    with pytest.raises(TypeError, match="trusted must be True or False"):
        InceptionFeatures.from_file(tmp_path / "net.pt", trusted="yes")
    with pytest.raises(FileNotFoundError):  # a missing file is still reported as such
        InceptionFeatures.from_file(tmp_path / "missing.pt")


# -- train_dit ----------------------------------------------------------------------------------------------------

CFG = TrainConfig(steps=2, batch_size=4, warmup=1, checkpoint_every=1)


def _data(gen, n=10):
    x = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    return x, torch.randint(0, 10, (n,), generator=gen)


def _dit(**changes):
    torch.manual_seed(0)
    return DiT(dit_config("DiT-test-1ch").replace(**changes))


def test_train_dit_rejects_bad_state_files(tmp_path, gen):
    x, y = _data(gen)
    d = create_diffusion("")
    (tmp_path / "tensor").mkdir()
    torch.save(torch.zeros(3), tmp_path / "tensor" / STATE_FILE)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a training state"):
        train_dit(_dit(), x, y, d, CFG, tmp_path / "tensor", progress=False)
    (tmp_path / "partial").mkdir()
    torch.save({"train_config": dataclasses.asdict(CFG)}, tmp_path / "partial" / STATE_FILE)
    with pytest.raises(CheckpointError, match=r"not a complete training state \(missing \['model'"):
        train_dit(_dit(), x, y, d, CFG, tmp_path / "partial", progress=False)
    train_dit(_dit(), x, y, d, CFG, tmp_path / "run", progress=False, stop_after=1)
    with pytest.raises(CheckpointError, match=r"different DiT config .*'hidden_size': \(32, 64\)"):
        train_dit(_dit(hidden_size=64), x, y, d, CFG, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"different DiT config .*'class_dropout_prob': \(0.1, 0.2\)"):
        train_dit(_dit(class_dropout_prob=0.2), x, y, d, CFG, tmp_path / "run", progress=False)
    st = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    st["model"] = {"junk": torch.zeros(1)}
    torch.save(st, tmp_path / "run" / STATE_FILE)
    with pytest.raises(CheckpointError, match="cannot resume from it"):
        train_dit(_dit(), x, y, d, CFG, tmp_path / "run", progress=False)


def test_train_dit_rejects_bad_config_and_data(tmp_path, gen):
    x, y = _data(gen)
    d = create_diffusion("")
    for field in ("batch_size", "checkpoint_every", "steps"):
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be an int >= 1, got 0"):
            dataclasses.replace(CFG, **{field: 0})
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=NAN)
    with pytest.raises(ValueError, match="images is empty"):
        train_dit(_dit(), x[:0], y[:0], d, CFG, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"images must be a tensor \(N, 1, 8, 8\)"):
        train_dit(_dit(), x[:, :, :4], y, d, CFG, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*got values in \[1, 10\]"):
        train_dit(_dit(), x, torch.arange(10) + 1, d, CFG, tmp_path / "a", progress=False)
    bad = x.clone()
    bad[3, 0, 1, 1] = NAN
    with pytest.raises(ValueError, match="images contain NaN or Inf"):
        train_dit(_dit(), bad, y, d, CFG, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="learn_sigma=True but the diffusion's variance is 'fixed_large'"):
        train_dit(_dit(), x, y, create_diffusion("", learn_sigma=False), CFG, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="learn_sigma=False but the diffusion's variance is 'learned_range'"):
        train_dit(_dit(learn_sigma=False), x, y, d, CFG, tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / STATE_FILE).exists()
    # the valid pairing trains
    ema, record = train_dit(_dit(learn_sigma=False), x, y, create_diffusion("", learn_sigma=False), CFG,
                            tmp_path / "b", progress=False)
    assert (tmp_path / "b" / STATE_FILE).exists()
