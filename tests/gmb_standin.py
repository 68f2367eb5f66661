"""A tiny digits-shaped DiT for the calibration and fine-tuning tests, and its sampling trajectories.

The real :class:`~treeq_engine.models.dit.DiT` (8×8 one-channel input, patch 2, width 24, 2 blocks) with random
weights instead of adaLN-Zero's zeros (so every block does something), and a few outlier channels in the
modulation, as trained DiTs have. Trajectories come from the real sampler (:func:`dit_trajectory`).
"""
import math

import torch
import torch.nn as nn

from treeq_engine.calib.data import dit_trajectory, random_labels
from treeq_engine.models.dit import DiT, DiTConfig

CLASSES = 4


def tiny_dit(seed=0, d=24, depth=2):
    torch.manual_seed(seed)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=d, depth=depth, num_heads=2,
                          num_classes=CLASSES, learn_sigma=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for blk in model.blocks:  # outlier input channels for qkv (shift/scale rows) and fc1
            ada = blk.adaLN_modulation[1]
            ada.weight[:3] *= 8.0
            ada.bias[:3] += 3.0
            ada.weight[3 * d:3 * d + 2] *= 8.0
    return model.eval()


def trajectory(model, n=4, steps=3, seed=0):
    """The (x_t, t, y) inputs of one DDPM sampling run of ``model`` (guidance 1.5: the doubled batch)."""
    return dit_trajectory(model, random_labels(n, CLASSES, seed), steps=steps, cfg_scale=1.5, seed=seed)


class Wrapped(nn.Module):
    """The same network without the staged interface: calibration then walks it as one stage."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, y):
        return self.inner(x, t, y)


def assert_same_up_to_rounding_flips(packed, sim, batches):
    """The packed model's integer GEMM and the simulation's float matmul differ by an ulp here and there; where
    that puts a value on the other side of a rounding boundary of a later quantizer, one code moves by a step.
    So: almost every output equal within 1e-3, and the rare flips small."""
    with torch.no_grad():
        for b in batches:
            ref, got = sim(*b), packed(*b)
            diff = (got - ref).abs()
            assert float((diff > 1e-3).float().mean()) < 0.02
            assert float(diff.max()) < 0.1 * float(ref.abs().max())
