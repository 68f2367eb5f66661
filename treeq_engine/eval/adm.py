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
(``.pt2``) or a TorchScript file; both formats can run code stored in the file when loaded, so it takes
``trusted=True``, to be passed only for a file the user made or trusts. Resizing to the network's input is the
network's job, as in ADM.

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

from .metrics import check_gaussian, feature_stats, frechet_distance


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
        if not callable(fn):
            raise TypeError(f"the feature network must be callable, got {type(fn).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.fn = fn
        self.batch_size = batch_size
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, path: str | Path, *, trusted: bool = False, **kw: Any) -> "InceptionFeatures":
        """Load the network from a ``torch.export`` program (``.pt2``) or a TorchScript file (anything else,
        e.g. clean-fid's ``inception-2015-12-05.pt``); ``kw`` go to :class:`InceptionFeatures`.

        Loading either format can run code stored in the file (``torch.export.load`` unpickles parts of the
        archive, ``torch.jit.load`` builds the module the file describes), so ``trusted`` must be ``True``: pass
        it only for a file you made yourself or got from a source you trust. There is no safe subset to fall
        back to; for an untrusted network, build it in your own code and pass the callable to the constructor."""
        import warnings

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception feature network {str(path)!r} not found (this project downloads "
                                    "nothing: supply the network file yourself)")
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted must be True or False, got {trusted!r}")
        if not trusted:
            kind = "torch.export program (.pt2)" if path.suffix == ".pt2" else "TorchScript file"
            raise ValueError(f"{path}: loading a {kind} can run code stored in the file; pass trusted=True only "
                             "for a file you made or trust")
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

    @staticmethod
    def _rows(key: str, v: Any, n: int) -> np.ndarray:
        """One output of the network on ``n`` images as ``(n, D)`` float64, after checking it is one row of at
        least one value per image (a wrong row count would silently mix images up in the statistics)."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"the feature network's {key!r} must be a tensor, got {type(v).__name__}")
        if v.dim() < 2 or v.shape[0] != n or v[0].numel() == 0:
            raise ValueError(f"the feature network's {key!r} must be (N, D) (or (N, ...), flattened) with N = {n} "
                             f"images in the batch and D >= 1, got shape {tuple(v.shape)}")
        return v.detach().reshape(n, -1).double().cpu().numpy()

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        imgs = torch.as_tensor(np.asarray(images))
        if imgs.dtype != torch.uint8 or imgs.dim() != 4 or imgs.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3) as in ADM's .npz, got {imgs.dtype} "
                             f"{tuple(imgs.shape)}")
        if imgs.shape[0] == 0:
            raise ValueError(f"no images to compute features of (shape {tuple(imgs.shape)})")
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, imgs.shape[0], self.batch_size):
            batch = imgs[i:i + self.batch_size]
            out = self._as_dict(self.fn(batch.to(self.device)))
            if parts and set(out) != set(parts):
                raise ValueError(f"the feature network returned keys {sorted(out)} for images {i}.. but "
                                 f"{sorted(parts)} before")
            for k, v in out.items():
                rows = self._rows(k, v, batch.shape[0])
                if k in parts and rows.shape[1] != parts[k][0].shape[1]:
                    raise ValueError(f"the feature network's {k!r} has {rows.shape[1]} values per image for "
                                     f"images {i}.. but {parts[k][0].shape[1]} before")
                parts.setdefault(k, []).append(rows)
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
            # The statistics are used as they are, so check them here: a corrupt or hand-made sigma would
            # otherwise give a wrong FID or an eigensolver failure much later.
            mu, sigma = check_gaussian(npz["mu"], npz["sigma"], f"{path}: 'mu'/'sigma'")
            if len({"mu_s", "sigma_s"} & keys) == 1:
                raise ValueError(f"{path}: holds only one of 'mu_s'/'sigma_s'; the spatial statistics need both")
            if {"mu_s", "sigma_s"} <= keys:
                return ReferenceStats(mu, sigma, *check_gaussian(npz["mu_s"], npz["sigma_s"],
                                                                 f"{path}: 'mu_s'/'sigma_s'"))
            return ReferenceStats(mu, sigma)
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
    """ADM's IS: mean over consecutive splits of ``exp(mean_x Σ_y p(y|x)·(log p(y|x) − log p̄(y)))``.

    ``probs_or_logits (N, classes)``: probabilities (rows of non-negative values summing to 1) or, with
    ``logits=True``, finite logits."""
    if isinstance(split_size, bool) or not isinstance(split_size, (int, np.integer)) or split_size <= 0:
        raise ValueError(f"split_size must be a positive int, got {split_size!r}")
    p = np.asarray(probs_or_logits, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"class scores must be (N, classes) with N, classes >= 1, got shape {p.shape}")
    what = "logits" if logits else "probabilities"
    if not np.isfinite(p).all():
        raise ValueError(f"class {what} contain NaN or Inf ({int((~np.isfinite(p)).sum())} of {p.size} values)")
    if logits:
        p = np.exp(p - p.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    else:
        # Unnormalised scores (logits passed without logits=True, say) give a number that is not IS. The
        # tolerance allows half-precision softmax outputs.
        sums = p.sum(1)
        if (p < 0).any() or np.abs(sums - 1).max() > 1e-2:
            raise ValueError(f"class probabilities must be non-negative with rows summing to 1, got values in "
                             f"[{p.min():.3g}, {p.max():.3g}] and row sums in [{sums.min():.3g}, {sums.max():.3g}] "
                             "(for logits pass logits=True)")
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
    bad = int((~torch.isfinite(samples)).sum())
    if bad:  # the clamp would turn them into black or white pixels that look like a real image
        raise ValueError(f"samples contain NaN or Inf ({bad} of {samples.numel()} values)")
    x = torch.clamp(127.5 * samples.float() + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def adm_metrics(images: np.ndarray, reference: ReferenceStats, features: InceptionFeatures) -> dict[str, float]:
    """``{"fid", "sfid", "inception_score"}`` of ``images`` (uint8 ``(N, H, W, 3)``) against ``reference``;
    sFID and IS appear only when the network (and reference) provide what they need."""
    if not isinstance(reference, ReferenceStats):
        raise TypeError(f"reference must be ReferenceStats (see load_reference_batch), got {type(reference).__name__}")
    n = int(np.shape(images)[0]) if np.ndim(images) else 0
    if n < 2:  # a covariance needs two samples; say so before running the network
        raise ValueError(f"adm_metrics needs at least 2 images (FID fits a covariance), got {n}")
    feats = features(images)
    for key, mu in (("pool", reference.mu), ("spatial", reference.mu_s)):
        if key in feats and mu is not None and feats[key].shape[1] != np.size(mu):
            raise ValueError(f"the feature network's {key!r} has {feats[key].shape[1]} values per image but the "
                             f"reference's mean has {np.size(mu)}: use the network the reference was made with")
    out = {"fid": frechet_distance(*feature_stats(feats["pool"]), reference.mu, reference.sigma)}
    if "spatial" in feats and reference.mu_s is not None:
        out["sfid"] = frechet_distance(*feature_stats(feats["spatial"]), reference.mu_s, reference.sigma_s)
    if "probs" in feats:
        out["inception_score"] = inception_score(feats["probs"])
    elif "logits" in feats:
        out["inception_score"] = inception_score(feats["logits"], logits=True)
    return out
