"""Mixed-precision search: Tree-Structured Search with Environmental Noise Guidance, its baselines, budgets."""
from .costs import Budget, BudgetError, CostModel, LatencyTable, check_budget, cost_model, describe, environment_config
from .diffusers_runner import DiffusersRunner, capture_calls
from .eng import Environment
from .evaluator import DiTRunner, Evaluator, SegmentRunner
from .pareto import nondominated_fronts, pareto_drop
from .space import Leaf, SearchSpace, candidate_configs
from .tree import Node, SearchResult, tree_search

__all__ = ["Budget", "BudgetError", "CostModel", "DiTRunner", "DiffusersRunner", "Environment", "Evaluator", "LatencyTable", "Leaf",
           "Node", "SearchResult", "SearchSpace", "SegmentRunner", "candidate_configs", "capture_calls", "check_budget",
           "cost_model", "describe", "environment_config", "nondominated_fronts", "pareto_drop", "tree_search"]
