"""Layer-wise PROMA (Projected Microbatch Accumulation) for PyTorch models.

``ProjectedAccumulator`` (:mod:`proma.accumulator`) is the public API, configured by keywords or by one
:class:`~proma.options.AccumulatorOptions` (``PUBLISHED`` holds the published settings); :mod:`proma.capture`
holds the hooks (and :func:`proma.capture.capture_factors`, which returns every hooked call's X and D for one
microbatch), :mod:`proma.layers` the per-layer rules and their contribution kinds, :mod:`proma.solvers` the b x b solvers
(each declared in :mod:`reference.solvers`), :mod:`proma.testing` the per-rule harness ``check_rule``.
"""
from .accumulator import ProjectedAccumulator
from .capture import capture_factors
from .options import (
    INTRA_FORMS,
    PUBLISHED,
    PUBLISHED_NAME,
    SOLVERS,
    STRATEGIES,
    SYNCS,
    VARIANTS,
    AccumulatorOptions,
    published_options,
)

__all__ = ["ProjectedAccumulator", "capture_factors", "AccumulatorOptions", "PUBLISHED", "PUBLISHED_NAME",
           "published_options", "VARIANTS", "SOLVERS", "SYNCS", "INTRA_FORMS", "STRATEGIES"]
