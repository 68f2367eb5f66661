import json
import math

import pytest
import torch

from treeq_engine.eval.metrics import DigitsJudge
from treeq_engine.models.checkpoint import CheckpointError
from treeq_engine.models.classifier import (ClassifierConfig, DigitsClassifier, accuracy, load_digits_classifier,
                                            random_shift, save_classifier, train_classifier)
from treeq_engine.models.diffusion import create_diffusion
from treeq_engine.models.digits import (DIGITS_DIT, DigitsSplit, asset_path, digits_split, load_digits_dit,
                                        load_digits_images)
from treeq_engine.models.dit import DiT, dit_config
from treeq_engine.models.sample import sample
from treeq_engine.models.train import TrainConfig, train_dit


def test_digits_data_and_split():
    x, y = load_digits_images()
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background is -1
    x8, _ = load_digits_images(8)
    from sklearn.datasets import load_digits

    torch.testing.assert_close(x8[:, 0], torch.from_numpy(load_digits().images).float() / 8 - 1)
    s = digits_split()
    assert s.train_x.shape[0] == 1797 - 360 and s.test_x.shape[0] == 360
    assert torch.bincount(s.test_y).tolist() == [36] * 10
    again = digits_split()
    assert torch.equal(again.test_x, s.test_x) and torch.equal(again.train_y, s.train_y)
    train_rows = {tuple(r.tolist()) for r in s.train_x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in train_rows for r in s.test_x.flatten(1))
    assert overlap <= 2  # disjoint images (the data holds a few exact duplicates)
    assert not torch.equal(digits_split(seed=1).test_x, s.test_x)


def test_shipped_classifier():
    meta = json.loads(asset_path("digits_classifier", ".json").read_text())
    clf = load_digits_classifier()
    s = digits_split()
    acc = accuracy(clf, s.test_x, s.test_y)
    assert acc >= 0.97 and acc == pytest.approx(meta["record"]["test_accuracy"], abs=1e-6)
    assert clf.features(s.test_x[:5]).shape == (5, ClassifierConfig().feature_dim)
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        clf(torch.zeros(2, 1, 8, 8))
    with pytest.raises(CheckpointError, match="not found"):
        load_digits_classifier("/nonexistent/clf.safetensors")


def test_shipped_dit_meets_the_done_criterion():
    """FP class-conditional samples are recognisable: >= 90% accuracy by the shipped classifier (a small version
    of the demo's FP row: 50 samples, 20 steps)."""
    model = load_digits_dit()
    assert model.config == DIGITS_DIT and not model.training
    meta = json.loads(asset_path("digits_dit", ".json").read_text())
    assert meta["config"] == DIGITS_DIT.to_dict()
    labels = torch.arange(50) % 10
    imgs = sample(model, labels, steps=20, cfg_scale=1.5, seed=0)
    judge = DigitsJudge()
    assert judge.accuracy(imgs, labels) >= 0.9
    assert judge.frechet(imgs) < 10 * judge.frechet(digits_split().train_x[:50])


def test_random_shift(gen):
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = random_shift(x, gen, max_shift=1)
    for n in range(2):
        found = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if torch.equal(out[n, 0], torch.nn.functional.pad(x[n, 0], (1, 1, 1, 1), value=-1.0)
                                [1 + dy:7 + dy, 1 + dx:7 + dx])]
        assert found


def test_classifier_training_runs_and_saves(tmp_path):
    s = digits_split()
    small = DigitsSplit(s.train_x[:200], s.train_y[:200], s.test_x[:50], s.test_y[:50])
    model, record = train_classifier(small, epochs=2, config=ClassifierConfig(width=4, feature_dim=8), progress=False)
    assert set(record) >= {"test_accuracy", "train_accuracy"} and 0 <= record["test_accuracy"] <= 1
    save_classifier(model, tmp_path / "c.safetensors", record)
    back = load_digits_classifier(tmp_path / "c.safetensors")
    assert back.config.width == 4
    torch.testing.assert_close(back(s.test_x[:4]), model(s.test_x[:4]))
    save_classifier(DigitsClassifier(ClassifierConfig(width=4, feature_dim=8)), tmp_path / "d.safetensors", {})
    (tmp_path / "d.json").write_text(json.dumps({"config": {"width": 8}}))  # config and weights disagree
    with pytest.raises(CheckpointError, match="does not fit"):
        load_digits_classifier(tmp_path / "d.safetensors")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_resumes_to_the_same_weights(tmp_path, gen, one_thread):
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup=2, checkpoint_every=3, seed=5)
    x = torch.rand(30, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (30,), generator=gen)
    d = create_diffusion("")

    def fresh():
        torch.manual_seed(0)
        return DiT(dit_config("DiT-test-1ch"))

    ema_a, rec_a = train_dit(fresh(), x, y, d, cfg, tmp_path / "a", progress=False)
    train_dit(fresh(), x, y, d, cfg, tmp_path / "b", progress=False, stop_after=3)  # "killed" after 3 steps
    ema_b, rec_b = train_dit(fresh(), x, y, d, cfg, tmp_path / "b", progress=False)
    for k, v in ema_a.state_dict().items():
        assert torch.equal(v, ema_b.state_dict()[k]), k
    assert any(not torch.equal(v, fresh().state_dict()[k]) for k, v in ema_a.state_dict().items())
    with pytest.raises(CheckpointError, match="different TrainConfig"):
        train_dit(fresh(), x, y, d, TrainConfig(steps=7, batch_size=8), tmp_path / "b", progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train_state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot resume"):
        train_dit(fresh(), x, y, d, cfg, tmp_path / "c", progress=False)
    assert cfg.lr_at(0) == pytest.approx(5e-4)  # warm-up
    assert cfg.lr_at(5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0.75 * math.pi))))  # cosine
