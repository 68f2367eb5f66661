"""Environmental Noise Guidance (ENG): the setting of every layer outside the node being scored.

Reading (the paper's equation is not available; ``docs/sources.md``, reading A): while a node's
candidates are scored, each layer outside it runs at the *environment* config (the budget's uniform bits, e.g.
W4A4 for a W4A4 budget) with its quantization error scaled by one scalar λ ∈ [0, 1]:

    Q̃(v) = v + λ·(Q(v) − v)          on the weights and on the activations of every environment layer

(``QuantLinear.set_noise_scale``). λ = 1 scores a node inside a fully quantized model (aligned with PTQ: the
errors elsewhere stay); λ = 0 scores it inside the full-precision model (aligned with fine-tuning: the errors
elsewhere will be trained away, only the node's own error counts). The fixed layers (embedders, final layer, at
W8A8 by default) are part of the environment and carry λ too. The node's own layers always run at their
candidate config with λ = 1.

An *environment plan* (``plan``, one config per searched leaf) replaces the uniform config outside the node: a
node is then scored inside that plan rather than inside uniform bits. ``treeq search --env-plan ip`` uses the
integer-programming baseline's plan, so that each node is ranked in the mixed setting a final plan will have
(docs/search.md, "Environment plan"); λ scales its errors as above.
"""
from __future__ import annotations

import dataclasses
from typing import Any, cast

from ..plan import LayerConfig, PlanError


@dataclasses.dataclass(frozen=True)
class Environment:
    """ENG's environment: the config every searched layer outside the node runs at, and λ."""

    config: LayerConfig
    lam: float = 1.0
    plan: tuple[LayerConfig, ...] | None = None   # per searched leaf, in the space's order; overrides ``config``

    def __post_init__(self) -> None:
        if not isinstance(self.config, LayerConfig):
            raise PlanError(f"the ENG environment config must be a LayerConfig, got {type(self.config).__name__}")
        lam = float(self.lam)
        if not 0.0 <= lam <= 1.0:
            raise PlanError(f"ENG λ must be in [0, 1], got {self.lam}")
        object.__setattr__(self, "lam", lam)
        if self.plan is not None:
            plan = tuple(self.plan)
            bad = [i for i, c in enumerate(plan) if not isinstance(c, LayerConfig)]
            if not plan or bad:
                raise PlanError("the ENG environment plan must be a non-empty sequence of LayerConfig, one per "
                                f"searched leaf (entries {bad[:5]} are not)")
            object.__setattr__(self, "plan", plan)

    def layer(self, searched: bool, fixed: LayerConfig | None, index: int | None = None
              ) -> tuple[LayerConfig | None, float]:
        """(config, λ) of an environment layer (``index``: the searched leaf's, for an environment plan). At
        λ = 0 it is exactly full precision (v + 0·(Q(v) − v) = v), so the layer runs unquantized (faster)."""
        if not searched:
            cfg = fixed
        else:   # the evaluator checks that the plan has one config per searched leaf (and passes its index)
            cfg = self.config if self.plan is None else self.plan[cast(int, index)]
        if self.lam == 0.0:
            return None, 1.0
        return cfg, self.lam

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"config": self.config.to_dict(), "label": self.config.label, "lam": self.lam}
        if self.plan is not None:   # absent otherwise, so that earlier fingerprints (and resumes) hold
            d["plan"] = [c.to_dict() for c in self.plan]
        return d
