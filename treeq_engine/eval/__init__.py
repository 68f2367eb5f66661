"""Quality evaluation: metrics against the FP model and real data (:mod:`.metrics`), and the ADM suite
(:mod:`.adm`, with a user-supplied Inception network)."""
from .metrics import (DigitsJudge, EpsProbe, class_accuracy, compare_samples, feature_stats, frechet_distance, psnr,
                      ssim)

__all__ = ["DigitsJudge", "EpsProbe", "class_accuracy", "compare_samples", "feature_stats", "frechet_distance",
           "psnr", "ssim"]
