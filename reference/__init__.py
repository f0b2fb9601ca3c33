"""Exact, dense, float64 reference for PROMA (Projected Microbatch Accumulation), NumPy + SciPy only.

This package is the judge that the PyTorch implementation and the verification oracle are checked
against; it never imports torch. Index conventions in every docstring: b sequences, t tokens,
i in-features, o out-features, n (= P) flattened parameter size.

Modules
-------
projection   ``project_out``: exact projection onto the complement of a row span (global or per block).
accumulation ``accumulate`` / ``accumulate_history`` / ``accumulate_step``: PROMA over microbatches with
             a declared solver, relative bound and shrinkage.
solvers      the solver declarations (``SolverDeclaration``: name, options, NumPy definition), the one
             registry every layer reads ("none", "exact", "gram_schmidt", "ridge"; ``declare`` adds one).
intra        ``intra_project``: the intra-microbatch factored projection (our reading of the paper).
factors      per-sequence gradients of linear (weight, bias, ghost Gram), elementwise scale and
             embedding layers from their backprop factors.
policy       ``group_advantages`` (GRPO, Dr. GRPO), ``categorical_kl``, ``categorical_entropy``.
diagnostics  ``second_order_kl``, ``residual_overlap``.
blocks       ``normalize_blocks``: block partitions (one block per parameter tensor).
"""
from .accumulation import (
    DEFAULT_PASSES,
    DEFAULT_RIDGE,
    SOLVER_REGISTRY,
    SOLVERS,
    AccumulationOptions,
    AccumulationStep,
    accumulate,
    accumulate_history,
    accumulate_step,
    removed_component,
)
from .blocks import normalize_blocks
from .solvers import SOLVER_OPTIONS, SolverDeclaration, SolverOptions, declaration, declare, solver_names, undeclare
from .diagnostics import residual_overlap, second_order_kl
from .factors import (
    bias_seq_grads,
    embedding_seq_grads,
    linear_seq_gram,
    linear_seq_grads,
    scale_seq_grads,
    seq_index_for,
)
from .intra import FORMS, gradient_rows, intra_apply, intra_project, intra_subspaces
from .policy import categorical_entropy, categorical_kl, group_advantages
from .projection import default_rcond, project_out, row_space

__all__ = [
    "SOLVERS", "SOLVER_REGISTRY", "SOLVER_OPTIONS", "SolverDeclaration", "SolverOptions", "declare", "undeclare",
    "declaration", "solver_names", "FORMS", "DEFAULT_PASSES", "DEFAULT_RIDGE", "AccumulationOptions",
    "AccumulationStep",
    "project_out", "row_space", "default_rcond", "normalize_blocks",
    "accumulate", "accumulate_history", "accumulate_step", "removed_component",
    "gradient_rows", "intra_apply", "intra_project", "intra_subspaces",
    "linear_seq_grads", "linear_seq_gram", "bias_seq_grads", "scale_seq_grads", "embedding_seq_grads",
    "seq_index_for",
    "group_advantages", "categorical_kl", "categorical_entropy",
    "second_order_kl", "residual_overlap",
]
