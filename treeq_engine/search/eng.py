"""Environmental Noise Guidance (ENG): the setting of every layer outside the node being scored.

Reading (the paper's equation is not available; ``shared/research/paper.md`` §3.2, reading A): while a node's
candidates are scored, each layer outside it runs at the *environment* config (the budget's uniform bits, e.g.
W4A4 for a W4A4 budget) with its quantization error scaled by one scalar λ ∈ [0, 1]:

    Q̃(v) = v + λ·(Q(v) − v)          on the weights and on the activations of every environment layer

(``QuantLinear.set_noise_scale``). λ = 1 scores a node inside a fully quantized model (aligned with PTQ: the
errors elsewhere stay); λ = 0 scores it inside the full-precision model (aligned with fine-tuning: the errors
elsewhere will be trained away, only the node's own error counts). The fixed layers (embedders, final layer, at
W8A8 by default) are part of the environment and carry λ too. The node's own layers always run at their
candidate config with λ = 1.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..plan import LayerConfig, PlanError


@dataclasses.dataclass(frozen=True)
class Environment:
    """ENG's environment: the config every searched layer outside the node runs at, and λ."""

    config: LayerConfig
    lam: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.config, LayerConfig):
            raise PlanError(f"the ENG environment config must be a LayerConfig, got {type(self.config).__name__}")
        lam = float(self.lam)
        if not 0.0 <= lam <= 1.0:
            raise PlanError(f"ENG λ must be in [0, 1], got {self.lam}")
        object.__setattr__(self, "lam", lam)

    def layer(self, searched: bool, fixed: LayerConfig | None) -> tuple[LayerConfig | None, float]:
        """(config, λ) of an environment layer. At λ = 0 it is exactly full precision (v + 0·(Q(v) − v) = v),
        so the layer runs unquantized, which is faster."""
        cfg = self.config if searched else fixed
        if self.lam == 0.0:
            return None, 1.0
        return cfg, self.lam

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "label": self.config.label, "lam": self.lam}
