"""esmm: entire-space multi-task conversion modelling (ESMM and its family) in PyTorch.

The Python API (see :mod:`esmm.api` and ``docs/quickstart.py``)::

    import esmm

    run = esmm.fit("configs/esmm_sim.yaml", train=train_df, eval=valid_df)
    run.evaluate(test_df); run.predict(test_df); run.export("model.onnx", "onnx")
    scorer = esmm.load("model.onnx")

Names are imported on first use, so ``import esmm`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "fit": "esmm.api",
    "load": "esmm.api",
    "load_run": "esmm.api",
    "simulate": "esmm.api",
    "Run": "esmm.api",
    "Data": "esmm.api",
    "Predictor": "esmm.export",
    "Config": "esmm.config",
    "load_config": "esmm.config",
    "EsmmError": "esmm.errors",
    "UsageError": "esmm.errors",
    "ConfigError": "esmm.errors",
    "DataError": "esmm.errors",
    "ArgumentError": "esmm.errors",
}

__all__ = ["ArgumentError", "Config", "ConfigError", "Data", "DataError", "EsmmError",
           "Predictor", "Run", "UsageError", "__version__", "fit", "load", "load_config",
           "load_run", "simulate"]

if TYPE_CHECKING:
    from esmm.api import Data, Run, fit, load, load_run, simulate
    from esmm.config import Config, load_config
    from esmm.errors import ArgumentError, ConfigError, DataError, EsmmError, UsageError
    from esmm.export import Predictor


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
