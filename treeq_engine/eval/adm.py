"""The ADM evaluation suite's FID, sFID and Inception Score, with a user-supplied Inception network.

The peers (DiT, PTQ4DiT, Q-DiT, ...) report the numbers of OpenAI's guided-diffusion ``evaluator.py``:

    FID   Fréchet distance of Inception ``pool_3`` features (2048-d)
    sFID  Fréchet distance of the first 7 channels of ``mixed_6/conv`` (a 17×17×7 = 2023-d spatial feature)
    IS    exp(E_x KL(p(y|x) ‖ p(y))) of the softmax over Inception's classes, averaged over splits of 5000

No weights ship with this project and nothing is downloaded: the user supplies the network as an
:class:`InceptionFeatures`, either a saved network file or any callable, mapping a batch of images
``uint8 (N, H, W, 3)`` (as ADM's sample ``.npz`` files store them) to a dict with ``"pool"`` ``(N, 2048)``,
``"spatial"`` ``(N, 2023)`` and ``"logits"`` (or ``"probs"``) ``(N, classes)``; a tensor or a 1-tuple return
counts as ``pool`` alone (FID only). :meth:`InceptionFeatures.from_file` loads a ``torch.export`` program
(``.pt2``) or a TorchScript file. Resizing to the network's input is the network's job, as in ADM.

The reference batch is ADM's ``.npz`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``): its precomputed ``mu``,
``sigma`` (pool) and ``mu_s``, ``sigma_s`` (spatial) are used directly; a file with only ``arr_0`` images is
run through the network.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .metrics import feature_stats, frechet_distance


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Gaussian fits of a reference batch: pool ``mu (F,)``, ``sigma (F, F)``; spatial ``mu_s``, ``sigma_s``
    (``None`` when unavailable)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None


class InceptionFeatures:
    """Wraps a feature network: ``__call__(images uint8 (N, H, W, 3)) -> {"pool", "spatial", "logits"|"probs"}``
    as float64 numpy arrays, batched."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], batch_size: int = 64,
                 device: str | torch.device = "cpu") -> None:
        self.fn = fn
        self.batch_size = batch_size
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> "InceptionFeatures":
        """Load the network from a ``torch.export`` program (``.pt2``) or a TorchScript file (anything else,
        e.g. clean-fid's ``inception-2015-12-05.pt``)."""
        import warnings

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception feature network {str(path)!r} not found (this project downloads "
                                    "nothing: supply the network file yourself)")
        device = kw.get("device", "cpu")
        try:
            if path.suffix == ".pt2":
                net = torch.export.load(str(path)).module().to(device)   # loads where it was saved
                return cls(net, **kw)
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is how these networks ship
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(path), map_location=device)
        except Exception as e:  # noqa: BLE001 - both loaders fail on bad bytes in many ways
            kind = "torch.export program" if path.suffix == ".pt2" else "TorchScript module"
            raise ValueError(f"{path}: not a {kind} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return cls(net.eval(), **kw)

    @staticmethod
    def _as_dict(out: Any) -> dict[str, torch.Tensor]:
        if isinstance(out, torch.Tensor):
            return {"pool": out}
        if isinstance(out, Mapping):
            unknown = set(out) - {"pool", "spatial", "logits", "probs"}
            if unknown or "pool" not in out:
                raise ValueError(f"the feature network must return 'pool' and optionally 'spatial', 'logits' or "
                                 f"'probs'; got keys {sorted(out)}")
            return dict(out)
        if isinstance(out, (tuple, list)) and 1 <= len(out) <= 3:
            return dict(zip(("pool", "spatial", "logits"), out))
        raise ValueError(f"the feature network returned {type(out).__name__}; expected a tensor, a tuple "
                         "(pool, spatial, logits) or a dict")

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        imgs = torch.as_tensor(np.asarray(images))
        if imgs.dtype != torch.uint8 or imgs.dim() != 4 or imgs.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3) as in ADM's .npz, got {imgs.dtype} "
                             f"{tuple(imgs.shape)}")
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, imgs.shape[0], self.batch_size):
            out = self._as_dict(self.fn(imgs[i:i + self.batch_size].to(self.device)))
            for k, v in out.items():
                parts.setdefault(k, []).append(v.detach().reshape(v.shape[0], -1).double().cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}


def load_reference_batch(path: str | Path, features: InceptionFeatures | None = None) -> ReferenceStats:
    """Reference statistics from an ADM ``.npz``: its ``mu``/``sigma`` (+ ``mu_s``/``sigma_s``), or features of
    its ``arr_0`` images computed with ``features``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {str(path)!r} not found")
    try:
        npz = np.load(str(path), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    with npz:
        keys = set(npz.files)
        if {"mu", "sigma"} <= keys:
            spatial = (npz["mu_s"], npz["sigma_s"]) if {"mu_s", "sigma_s"} <= keys else (None, None)
            return ReferenceStats(npz["mu"], npz["sigma"], *spatial)
        if "arr_0" not in keys:
            raise ValueError(f"{path}: an ADM reference batch holds 'mu'/'sigma' or 'arr_0'; found {sorted(keys)}")
        if features is None:
            raise ValueError(f"{path} holds only images: pass the feature network to compute its statistics")
        images = npz["arr_0"]
    return reference_stats(features(images))


def reference_stats(feats: Mapping[str, np.ndarray]) -> ReferenceStats:
    mu, sigma = feature_stats(feats["pool"])
    if "spatial" in feats:
        return ReferenceStats(mu, sigma, *feature_stats(feats["spatial"]))
    return ReferenceStats(mu, sigma)


def inception_score(probs_or_logits: np.ndarray, split_size: int = 5000, logits: bool = False) -> float:
    """ADM's IS: mean over consecutive splits of ``exp(mean_x Σ_y p(y|x)·(log p(y|x) − log p̄(y)))``."""
    p = np.asarray(probs_or_logits, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"class scores must be (N, classes), got shape {p.shape}")
    if logits:
        p = np.exp(p - p.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, p.shape[0], split_size):
        part = p[i:i + split_size]
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """Model samples ``(N, C, H, W)`` in [−1, 1] -> ``uint8 (N, H, W, 3)`` exactly as DiT's ``sample_ddp.py``
    writes them (``clamp(127.5·x + 128, 0, 255)`` truncated; grey images repeated to 3 channels)."""
    if samples.dim() != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"samples must be (N, 1|3, H, W), got {tuple(samples.shape)}")
    x = torch.clamp(127.5 * samples.float() + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def adm_metrics(images: np.ndarray, reference: ReferenceStats, features: InceptionFeatures) -> dict[str, float]:
    """``{"fid", "sfid", "inception_score"}`` of ``images`` (uint8 ``(N, H, W, 3)``) against ``reference``;
    sFID and IS appear only when the network (and reference) provide what they need."""
    feats = features(images)
    out = {"fid": frechet_distance(*feature_stats(feats["pool"]), reference.mu, reference.sigma)}
    if "spatial" in feats and reference.mu_s is not None:
        out["sfid"] = frechet_distance(*feature_stats(feats["spatial"]), reference.mu_s, reference.sigma_s)
    if "probs" in feats:
        out["inception_score"] = inception_score(feats["probs"])
    elif "logits" in feats:
        out["inception_score"] = inception_score(feats["logits"], logits=True)
    return out
