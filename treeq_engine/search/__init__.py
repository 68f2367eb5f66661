"""Mixed-precision search: Tree-Structured Search with Environmental Noise Guidance, its baselines, budgets."""
from .chroma_runner import ChromaRunner
from .costs import Budget, BudgetError, CostModel, LatencyTable, check_budget, cost_model, describe, environment_config
from .diffusers_runner import DiffusersRunner, capture_calls, make_runner
from .eng import Environment
from .flux2_runner import Flux2Runner
from .ltx_runner import LTXRunner
from .mmdit_runner import MMDiTRunner
from .evaluator import DiTRunner, Evaluator, SegmentRunner
from .pareto import nondominated_fronts, pareto_drop
from .space import Leaf, SearchSpace, candidate_configs
from .tree import Node, SearchResult, tree_search
from .qwen_runner import QwenImageRunner
from .sana_runner import SanaRunner
from .wan_runner import WanRunner
from .zimage_runner import ZImageRunner

__all__ = ["Budget", "BudgetError", "CostModel", "DiTRunner", "DiffusersRunner", "Environment", "Evaluator", "LatencyTable", "Leaf",
           "MMDiTRunner", "Node", "SearchResult", "SearchSpace", "SegmentRunner", "candidate_configs", "capture_calls", "check_budget",
           "cost_model", "describe", "environment_config", "make_runner", "nondominated_fronts", "pareto_drop", "tree_search",
           "QwenImageRunner", "SanaRunner", "WanRunner", "ZImageRunner", "Flux2Runner", "LTXRunner",
           "ChromaRunner"]
