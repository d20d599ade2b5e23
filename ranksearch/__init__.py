"""ranksearch: automated rank search for low-rank and tensor-decomposition compression.

Find the decomposable layers of a model, price any rank configuration exactly, build the
compressed model from plain torch layers, and search per-layer ranks for a budget::

    space = ranksearch.RankSpace.discover(model, example_input)
    config = space.uniform(0.5)
    costs = ranksearch.CostModel(space).metrics(config)
    small = ranksearch.compress(model, config, cache=ranksearch.FactorCache(model, space))

    result = ranksearch.search(model, task, strategy="uniform", constraints=["flops<=0.5"])
    result.best("flops<=0.5")
"""

from . import calibration
from .cache import FactorCache
from .calibration import InputStats
from .config import Choice, Config
from .constraints import Constraint
from .cost import CostModel, EnergyTable, measure_latency
from .datasets import load_task
from .errors import (
    CandidateFailed,
    ConfigError,
    ConstraintError,
    ConstraintUnreachableError,
    DatasetNotFoundError,
    DecompositionError,
    ExportError,
    InputShapeError,
    InvalidRankError,
    ModelFileError,
    NoDecomposableLayersError,
    NotAdmittedError,
    OptionError,
    RankSearchError,
    StoreError,
    TaskError,
    UnknownLayerError,
    UnknownMethodError,
    UnknownModelError,
    UnknownStrategyError,
)
from .evaluate import Evaluator, ProxySettings
from .export import Exported, scored_model
from .fingerprint import Fingerprint
from .latency import LatencyTable
from .pareto import Objective
from .result import Result
from .search import SearchResult, search
from .site import Site
from .space import RankSpace, SpaceSpec
from .strategy import (
    Proposal,
    SearchContext,
    StopSearch,
    Strategy,
    Training,
    available_strategies,
    load_strategy,
)
from .surgery import compress, load, save
from .task import Task, load_user_task

__all__ = [
    "CandidateFailed",
    "Choice",
    "Config",
    "ConfigError",
    "Constraint",
    "ConstraintError",
    "ConstraintUnreachableError",
    "CostModel",
    "DatasetNotFoundError",
    "DecompositionError",
    "EnergyTable",
    "Evaluator",
    "ExportError",
    "Exported",
    "FactorCache",
    "Fingerprint",
    "InputShapeError",
    "InputStats",
    "InvalidRankError",
    "LatencyTable",
    "ModelFileError",
    "NoDecomposableLayersError",
    "NotAdmittedError",
    "Objective",
    "OptionError",
    "Proposal",
    "ProxySettings",
    "RankSearchError",
    "RankSpace",
    "Result",
    "SearchContext",
    "SearchResult",
    "Site",
    "SpaceSpec",
    "StopSearch",
    "StoreError",
    "Strategy",
    "Task",
    "TaskError",
    "Training",
    "UnknownLayerError",
    "UnknownMethodError",
    "UnknownModelError",
    "UnknownStrategyError",
    "available_strategies",
    "calibration",
    "compress",
    "load",
    "load_strategy",
    "load_task",
    "load_user_task",
    "measure_latency",
    "save",
    "scored_model",
    "search",
]
__version__ = "0.1.0"
