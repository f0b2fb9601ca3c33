"""Layer-wise PROMA (Projected Microbatch Accumulation) for PyTorch models.

``ProjectedAccumulator`` (:mod:`proma.accumulator`) is the public API; :mod:`proma.capture` holds the hooks
(and :func:`proma.capture.capture_factors`, which returns every hooked call's X and D for one microbatch),
:mod:`proma.layers` the per-layer rules and :mod:`proma.projection` the b x b solvers.
"""
from .accumulator import ProjectedAccumulator
from .capture import capture_factors

__all__ = ["ProjectedAccumulator", "capture_factors"]
