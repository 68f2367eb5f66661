"""The digits task: scikit-learn's bundled handwritten digits as 16×16 images, and the shipped digits DiT.

Data: ``sklearn.datasets.load_digits()`` (1797 grey 8×8 images, values 0..16, 10 classes; bundled with the
package, no download), scaled to [0, 1], upsampled bilinearly to 16×16 and mapped to [−1, 1], one channel.
A fixed, seeded, class-stratified split holds out ``HOLDOUT_PER_CLASS`` images of each class: the DiT and the
classifier train on the rest, and the held-out images are the real reference for the Fréchet distance.

Model: :data:`DIGITS_DIT` is a class-conditional DiT in pixel space (16×16, patch 2, 64 tokens, 6 blocks of
width 128, learned variance). Its trained EMA weights ship as ``treeq_engine/assets/digits_dit.safetensors``
with ``digits_dit.json`` (config and training record); ``scripts/train_digits.py`` reproduces them by seed.
"""
from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from .dit import DiT, DiTConfig

IMAGE_SIZE = 16
NUM_CLASSES = 10
HOLDOUT_PER_CLASS = 36
SPLIT_SEED = 0

DIGITS_DIT = DiTConfig(input_size=IMAGE_SIZE, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                       mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES, learn_sigma=True)

DIT_ASSET = "digits_dit"
CLASSIFIER_ASSET = "digits_classifier"


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """Images ``(N, 1, 16, 16)`` float32 in [−1, 1] and labels ``(N,)`` int64, for training and held out."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, size, size)`` float32 in [−1, 1] and labels ``(N,)`` int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the models extra installs it
        raise ImportError("the digits data needs scikit-learn (pip install 'treeq-engine[models]')") from e
    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(d.target).long()


def digits_split(seed: int = SPLIT_SEED, holdout_per_class: int = HOLDOUT_PER_CLASS) -> DigitsSplit:
    """The fixed split: ``holdout_per_class`` images of each class, drawn with ``seed``, are held out."""
    x, y = load_digits_images()
    gen = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        if len(idx) <= holdout_per_class:
            raise ValueError(f"class {c} has {len(idx)} images; cannot hold out {holdout_per_class}")
        test[idx[torch.randperm(len(idx), generator=gen)[:holdout_per_class]]] = True
    return DigitsSplit(x[~test], y[~test], x[test], y[test])


def asset_path(name: str, suffix: str) -> Path:
    """Path of a shipped asset, e.g. ``asset_path("digits_dit", ".safetensors")``."""
    return Path(str(resources.files("treeq_engine") / "assets" / f"{name}{suffix}"))


def load_any_dit(path: str | Path, config: str | None = None, *, device: str | torch.device = "cpu") -> DiT:
    """The DiT at ``path``, as every command reads ``--model``: with ``config`` (a registry name), that; with a
    ``.json`` config beside the weights (what the digits training writes), that config, since the head count and
    the null class are not in the shapes; else an official-layout checkpoint's config inferred from its shapes;
    else the digits config. In eval mode."""
    from .checkpoint import CheckpointError, load_dit_checkpoint

    weights = Path(path)
    if config is not None:
        return load_dit_checkpoint(weights, config, map_location=device)
    if weights.with_suffix(".json").is_file():
        return load_digits_dit(weights, device=device)
    try:
        return load_dit_checkpoint(weights, map_location=device)
    except CheckpointError as inferred:
        try:
            return load_digits_dit(weights, device=device)
        except CheckpointError as digits:
            raise CheckpointError(f"{weights}: not a DiT checkpoint this build reads (with its config inferred: "
                                  f"{inferred}; with the digits config: {digits})") from None


def load_digits_dit(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> DiT:
    """The trained digits DiT (the shipped asset by default; or a ``.safetensors`` with its ``.json`` beside it),
    in eval mode."""
    from .checkpoint import CheckpointError, load_dit_checkpoint

    weights = Path(path) if path is not None else asset_path(DIT_ASSET, ".safetensors")
    meta_path = weights.with_suffix(".json")
    config = DIGITS_DIT
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            config = DiTConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: not the JSON beside a digits DiT (an object whose 'config' is a "
                                  f"DiT config): {type(e).__name__}: {e}") from None
    model = load_dit_checkpoint(weights, config=config, map_location=device)
    return model.eval()
