"""A small CNN digits classifier: the judge of the digits metrics (class accuracy, Fréchet features).

    (N, 1, 16, 16) -> conv3x3(w) ReLU conv3x3(w) ReLU maxpool2 -> conv3x3(2w) ReLU maxpool2 -> (N, 2w·16)
                   -> fc1 -> features (N, F)  -> ReLU, dropout -> fc2 -> logits (N, 10)

``features`` (fc1's output, before the ReLU, so roughly Gaussian) play the role Inception's pool features play
in FID. The project trains it (``scripts/train_digits.py classifier``) on the training part of the fixed digits
split, with ±1 pixel random shifts, and ships it as ``assets/digits_classifier.safetensors`` with its
``.json`` (config and held-out accuracy).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import CLASSIFIER_ASSET, NUM_CLASSES, DigitsSplit, asset_path


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    width: int = 32
    feature_dim: int = 64
    num_classes: int = NUM_CLASSES
    image_size: int = 16


class DigitsClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.fc1 = nn.Linear(2 * w * (config.image_size // 4) ** 2, config.feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 1, 16, 16)`` in [−1, 1] -> features ``(N, F)``."""
        s = self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"the digits classifier takes (N, 1, {s}, {s}) images, got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return self.fc1(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.features(x))))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image ``(N, 1, H, W)`` shifted by up to ``max_shift`` pixels each way, background (−1) filled in."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)[:, 0]  # (N, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = dy[:, None, None] + torch.arange(h)[None, :, None]
    cols = dx[:, None, None] + torch.arange(w)[None, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def train_classifier(split: DigitsSplit, *, epochs: int = 40, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, config: ClassifierConfig = ClassifierConfig(),
                     progress: bool = True) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train on ``split.train_*`` (Adam, cosine lr, ±1 px shifts); report held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = split.train_x.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc="classifier")
    t0 = time.time()
    for _ in epochs_iter:
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = random_shift(split.train_x[idx], gen)
            loss = F.cross_entropy(model(x), split.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    record = {"train_accuracy": accuracy(model, split.train_x, split.train_y),
              "test_accuracy": accuracy(model, split.test_x, split.test_y),
              "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_seconds": round(time.time() - t0, 1)}
    return model.eval(), record


def save_classifier(model: DigitsClassifier, path: str | Path, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    meta = {"config": dataclasses.asdict(model.config), "record": record}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


def load_digits_classifier(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The shipped classifier (or one saved by :func:`save_classifier`), in eval mode."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, check_state_dict

    path = Path(path) if path is not None else asset_path(CLASSIFIER_ASSET, ".safetensors")
    if not path.is_file():
        raise CheckpointError(f"digits classifier weights {str(path)!r} not found (train them with "
                              "scripts/train_digits.py classifier)")
    meta_path = path.with_suffix(".json")
    config = ClassifierConfig(**json.loads(meta_path.read_text())["config"]) if meta_path.exists() else ClassifierConfig()
    model = DigitsClassifier(config)
    sd = load_file(str(path), device=str(device))
    check_state_dict(model, sd, where=str(path))
    model.load_state_dict(sd)
    return model.to(device).eval()
