"""Golden oracle cases: synthetic factors with fixed seeds (the recipes), expected results from the NumPy
reference (:mod:`.expected`).

Index conventions: b sequences of a microbatch, t tokens, i in-features, o out-features, P parameter size.
A case's per-sequence gradient of layer k in microbatch m is the sum over the layer's uses (FORMAT.md):
``g_j = sum_{t in j} D_t^T X_t`` for a linear use, ``seq_grads[j]`` for a dense use.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

import reference

from .expected import compute_expected
from .format import Case, Layer, Settings, use_key, weights_key
from .settings import case_solvers


# ---------------------------------------------------------------------------------- synthetic factors
BASIC_LAYERS = (
    Layer("fc1.weight", (5, 4), ("linear",)),
    Layer("fc1.bias", (5,), ("dense",)),
    Layer("norm.weight", (4,), ("dense",)),
)
TIED_LAYERS = (
    # an output head tied to an input embedding (as Qwen3-0.6B): head use + embedding use
    Layer("embed.weight", (6, 3), ("linear", "dense")),
    # one linear module called twice per forward (or two modules sharing a weight)
    Layer("shared.weight", (3, 3), ("linear", "linear")),
)
# fewer parameters than sequences per microbatch: the Gram has full column rank, exact removes all of G
TINY_LAYER = Layer("gate.scale", (2,), ("dense",))
FULL_LAYERS = BASIC_LAYERS + TIED_LAYERS + (TINY_LAYER,)


@dataclass(frozen=True)
class Recipe:
    """How to draw one synthetic case.

    sizes: sequences per microbatch. duplicates: (m, j, m_src, j_src) copies sequence j_src of microbatch
    m_src onto sequence j of microbatch m (all layers, all uses; rank-deficient Grams). empty: (m, j)
    sequences with no tokens and zero dense gradients (zero rows). zero_weights: (m, j) with j = None for
    the whole microbatch. shuffle: token rows in random order instead of sequence order. Tokens per sequence
    and linear use are drawn from min_tokens..max_tokens. scale: every gradient (D rows, dense gradients)
    multiplied by it, so every expected array scales by it. span: in every linear layer with o >= b, one
    token per sequence and one input row x shared by the microbatch; output rows of norms ``span`` in
    random directions (relative singular values ~ span), or with ``dependent`` the rows
    ``U diag(span) V^T`` (nearly dependent sequences: singular values exactly span). float32_inputs: factors and weights rounded to float32
    values (stored as float64), so a float32 implementation reads the very inputs the reference used.
    planted_rows: relative sizes c_k; in every linear use of every microbatch, token row k's output gradient is
    rescaled so that its largest entry is c_k times D's largest, and its activation row is multiplied by
    :data:`PLANTED_X_SCALE` (so whether intra counts the token moves its activation subspace).
    """

    id: str
    description: str
    settings: Settings
    layers: tuple = FULL_LAYERS
    sizes: tuple = (3, 2, 4)
    duplicates: tuple = ()
    empty: tuple = ()
    zero_weights: tuple = ()
    shuffle: bool = False
    max_tokens: int = 4
    tags: tuple = ()
    min_tokens: int = 1
    scale: float = 1.0
    span: tuple = ()
    dependent: bool = False
    float32_inputs: bool = False
    planted_rows: tuple = ()


def _draw_case(recipe: Recipe, seed: int) -> Case:
    rng = np.random.default_rng([seed, zlib.crc32(recipe.id.encode())])
    bounds = [0] + list(np.cumsum(recipe.sizes).tolist())
    case = Case(id=recipe.id, description=recipe.description, settings=recipe.settings,
                layers=list(recipe.layers), boundaries=bounds, tags=list(recipe.tags))
    # per sequence and use: (X rows, D rows) for linear uses, a gradient for dense uses
    seqs = {}
    for m, b in enumerate(recipe.sizes):
        for j in range(b):
            per_layer = []
            for layer in recipe.layers:
                per_use = []
                for kind in layer.uses:
                    if kind == "linear":
                        o, i = layer.shape
                        t = int(rng.integers(recipe.min_tokens, recipe.max_tokens + 1))
                        per_use.append((rng.standard_normal((t, i)), rng.standard_normal((t, o))))
                    else:
                        per_use.append(rng.standard_normal(layer.shape))
                per_layer.append(per_use)
            seqs[m, j] = per_layer
    for m, j, m_src, j_src in recipe.duplicates:
        seqs[m, j] = seqs[m_src, j_src]
    for m, j in recipe.empty:
        seqs[m, j] = [[(x[0][:0], x[1][:0]) if isinstance(x, tuple) else np.zeros_like(x) for x in per_use]
                      for per_use in seqs[m, j]]
    for m, b in enumerate(recipe.sizes):
        w = rng.standard_normal(b)
        for mz, jz in recipe.zero_weights:
            if mz == m:
                w[slice(None) if jz is None else jz] = 0.0
        case.arrays[weights_key(m)] = w
        for k, layer in enumerate(recipe.layers):
            for u, kind in enumerate(layer.uses):
                if kind == "linear":
                    X = np.concatenate([seqs[m, j][k][u][0] for j in range(b)])
                    D = np.concatenate([seqs[m, j][k][u][1] for j in range(b)])
                    seq = np.concatenate([np.full(len(seqs[m, j][k][u][0]), j, dtype=np.int64) for j in range(b)])
                    if recipe.shuffle:
                        order = rng.permutation(len(seq))
                        X, D, seq = X[order], D[order], seq[order]
                    case.arrays[use_key(m, k, u, "X")] = X
                    case.arrays[use_key(m, k, u, "D")] = D
                    case.arrays[use_key(m, k, u, "seq")] = seq.astype(np.int64)
                else:
                    case.arrays[use_key(m, k, u, "seq_grads")] = np.stack([seqs[m, j][k][u] for j in range(b)])
    if recipe.span:
        _impose_span(case, recipe.span, recipe.dependent, rng)
    if recipe.planted_rows:
        _plant_rows(case, recipe.planted_rows)
    _rescale(case, recipe.scale, recipe.float32_inputs)
    return compute_expected(case)


def _impose_span(case: Case, span: tuple, dependent: bool, rng) -> None:
    """Give every linear layer with o >= b_m sequence gradients of relative sizes ``span``.

    With one token per sequence and one input row x shared by the microbatch, ``g_j = d_j x^T``, so the
    flattened gradients are ``D kron x`` and their singular values are those of D times ``||x||``. D is
    ``diag(s) W`` with unit random rows W (directions well apart, the Gram's Jacobi-scaled form
    well conditioned) or, ``dependent``, ``U diag(s) V^T`` with random orthonormal U (b, b) and V (o, b).
    """
    for m in range(case.n_microbatches):
        b = case.batch_size(m)
        s = np.resize(np.asarray(span, dtype=np.float64), b)
        for k, layer in enumerate(case.layers):
            o, i = layer.shape
            if layer.uses != ("linear",) or o < b:
                continue
            if dependent:
                U = np.linalg.qr(rng.standard_normal((b, b)))[0]
                D = (U * s) @ np.linalg.qr(rng.standard_normal((o, b)))[0].T
            else:
                W = rng.standard_normal((b, o))
                D = s[:, None] * W / np.linalg.norm(W, axis=1, keepdims=True)
            case.arrays[use_key(m, k, 0, "X")] = np.repeat(rng.standard_normal((1, i)), b, axis=0)
            case.arrays[use_key(m, k, 0, "D")] = D
            case.arrays[use_key(m, k, 0, "seq")] = np.arange(b, dtype=np.int64)


def _plant_rows(case: Case, planted: tuple) -> None:
    """Token rows 0, 1, ... of every linear use: output gradient at ``planted[k]`` of D's largest entry, activation
    times :data:`PLANTED_X_SCALE` (uses with fewer token rows than ``planted`` are left alone)."""
    for m in range(case.n_microbatches):
        for k, layer in enumerate(case.layers):
            for u, kind in enumerate(layer.uses):
                X, D = case.arrays.get(use_key(m, k, u, "X")), case.arrays.get(use_key(m, k, u, "D"))
                if kind != "linear" or X is None or len(D) <= len(planted):
                    continue
                top = np.abs(D[len(planted):]).max()
                for row, c in enumerate(planted):
                    D[row] *= c * top / np.abs(D[row]).max()
                    X[row] *= PLANTED_X_SCALE


def _rescale(case: Case, scale: float, float32_inputs: bool) -> None:
    """Multiply every output gradient by ``scale`` (a power of 2: exact) and optionally round to float32."""
    for key, a in case.arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            continue
        if key.endswith(("/D", "/seq_grads")):
            a = a * scale
        case.arrays[key] = a.astype(np.float32).astype(np.float64) if float32_inputs else a


def _recipes() -> list:
    exact = Settings(variant="proma", solver="exact")
    rank_def = dict(duplicates=((0, 2, 0, 0), (1, 1, 0, 1), (2, 3, 2, 1)), empty=((2, 0),), sizes=(3, 2, 4, 3))
    R = Recipe
    return [
        R("none_plain", "plain accumulation (variant none): G_m = G_{m-1} + pg_m", Settings(variant="none"),
          sizes=(3, 1, 4, 2), tags=("none", "many-microbatches", "tied")),
        R("exact_single_microbatch", "exact PROMA with one microbatch: G_1 = pg_1 (nothing to project)", exact,
          layers=BASIC_LAYERS, sizes=(4,), tags=("single-microbatch",)),
        R("exact_many_microbatches", "exact PROMA over 6 microbatches of 1-4 sequences; token rows shuffled",
          exact, sizes=(1, 3, 2, 4, 1, 3), shuffle=True, tags=("many-microbatches", "tied")),
        R("exact_rank_deficient", "exact PROMA; duplicated sequences within and across microbatches and a "
          "sequence with no tokens: rank-deficient Grams", exact, tags=("rank-deficient", "tied"), **rank_def),
        R("exact_zero_weights", "exact PROMA; microbatch 1 has two zero weights, microbatch 2 all zero",
          exact, sizes=(3, 4, 3, 2), zero_weights=((1, 0), (1, 2), (2, None)), tags=("zero-weights", "tied")),
        R("exact_tied_only", "exact PROMA on tied parameters only: a head tied to an embedding and a linear "
          "weight used twice; per-sequence gradients sum the uses", exact, layers=TIED_LAYERS,
          sizes=(2, 3, 3), tags=("tied",)),
        R("exact_shrinkage_0.5", "exact PROMA with shrinkage 0.5", replace(exact, shrinkage=0.5),
          tags=("shrinkage", "tied")),
        R("exact_relative_bound_0.5", "exact PROMA capped by relative_bound 0.5 (an all-zero-weight "
          "microbatch removes nothing)", replace(exact, relative_bound=0.5), sizes=(3, 2, 4, 3),
          zero_weights=((2, None),), tags=("relative-bound", "zero-weights", "tied")),
        R("gram_schmidt_passes1", "Gram-Schmidt solver, 1 pass, on rank-deficient microbatches",
          Settings(solver="gram_schmidt", passes=1), tags=("gram_schmidt", "rank-deficient", "tied"), **rank_def),
        R("gram_schmidt_passes2", "Gram-Schmidt solver, 2 passes, on rank-deficient microbatches",
          Settings(solver="gram_schmidt", passes=2), tags=("gram_schmidt", "rank-deficient", "tied"), **rank_def),
        R("gram_schmidt_passes4", "Gram-Schmidt solver, 4 passes", Settings(solver="gram_schmidt", passes=4),
          sizes=(2, 4, 3), tags=("gram_schmidt", "tied")),
        R("ridge_1e-2", "ridge solver, ridge 1e-2, on rank-deficient microbatches",
          Settings(solver="ridge", ridge=1e-2), tags=("ridge", "rank-deficient", "tied"), **rank_def),
        R("ridge_1", "ridge solver, ridge 1.0", Settings(solver="ridge", ridge=1.0), tags=("ridge", "tied")),
        R("paper_settings", "the published run's settings: Gram-Schmidt 2 passes, relative_bound 0.5, "
          "shrinkage 1", Settings(solver="gram_schmidt", passes=2, relative_bound=0.5),
          sizes=(3, 3, 2, 4), zero_weights=((1, 1),), tags=("gram_schmidt", "relative-bound", "tied")),
        R("ridge_bound_shrinkage", "ridge 1e-1 with relative_bound 0.25 and shrinkage 0.8",
          Settings(solver="ridge", ridge=0.1, relative_bound=0.25, shrinkage=0.8),
          tags=("ridge", "relative-bound", "shrinkage", "tied")),
        R("intra_two_sided_rank1", "intra-microbatch projection, two-sided, rank 1",
          Settings(variant="intra", intra_rank=1, intra_form="two_sided"), tags=("intra", "tied")),
        R("intra_two_sided_rank2", "intra-microbatch projection, two-sided, rank 2; duplicated sequences",
          Settings(variant="intra", intra_rank=2, intra_form="two_sided"), tags=("intra", "rank-deficient", "tied"),
          **rank_def),
        R("intra_kron_rank1", "intra-microbatch projection, Kronecker form, rank 1",
          Settings(variant="intra", intra_rank=1, intra_form="kron"), tags=("intra", "tied")),
        R("intra_kron_rank3", "intra-microbatch projection, Kronecker form, rank 3 (>= some layer dims)",
          Settings(variant="intra", intra_rank=3, intra_form="kron"), sizes=(2, 3), tags=("intra", "tied")),
    ]


# single-use linear weights only: an implementation that handles nn.Linear weights alone gets a full verdict.
# gate.weight has P = 2 parameters, fewer than the sequences of most microbatches (b > P).
LINEAR_LAYERS = (
    Layer("q.weight", (5, 4), ("linear",)),
    Layer("up.weight", (6, 3), ("linear",)),
    Layer("gate.weight", (1, 2), ("linear",)),
)
STRESS_SCALES = (2.0 ** -30, 2.0 ** 30)
# smallest relative size of a microbatch's sequence gradients: 2^-12 is where a float32 Gram (eigenvalues
# s^2 ~ eps32) stops resolving the span; 2^-23 is float32's own resolution (eps32); all are kept by the
# reference's float64 cutoff
STRESS_SPANS = (("1e-3", 1e-3), ("1e-5", 1e-5), ("f32gram", 2.0 ** -12), ("1e-7", 1e-7), ("f32eps", 2.0 ** -23))
# nearly dependent sequences: the exact projection itself is ill-conditioned (a relative input change e moves
# the span by ~e / s), so only moderate conditioning is a fair test of an implementation
STRESS_DEPENDENT_SPANS = (("1e-3", 1e-3), ("f32gram", 2.0 ** -12))
# intra's token rows (FORMAT.md, "Float32 implementations and the cutoffs"): a wide layer (o = 64, so o eps32 =
# 2^-17) whose planted tokens have output gradients at 1e-17 of the largest (rounding of an exact zero: the
# reference drops it, and so must a float32 implementation that reads it) and at 2^-19 (data, about 16 eps32:
# the reference keeps it, and a float32 cut at o eps32 would not)
WIDE_LAYERS = (Layer("wide.weight", (64, 4), ("linear",)),)
PLANTED_TOKEN_ROWS = (1e-17, 2.0 ** -19)
PLANTED_X_SCALE = 10.0


def _stress_recipes() -> list:
    """Cases that probe scale, conditioning and degenerate batches; linear-only, float32-exact inputs."""
    R = Recipe
    stress = dict(layers=LINEAR_LAYERS, float32_inputs=True)
    # every declared solver (reference.solvers) at its declaration's example options, then the other variants
    solvers = {name: Settings(solver=name, **reference.declaration(name).example) for name in case_solvers()}
    solvers.update({"none": Settings(variant="none"), "intra": Settings(variant="intra", intra_rank=1)})
    out = []
    for name, base in solvers.items():
        variants = [("", base)]
        if base.variant == "proma":
            variants.append(("_bound_shrink", replace(base, relative_bound=0.5, shrinkage=0.8)))
        for suffix, settings in variants:
            for scale in STRESS_SCALES:
                exp = int(np.log2(scale))
                out.append(R(f"stress_scale_2pow{exp}_{name}{suffix}",
                             f"{settings.label()} with every gradient multiplied by 2^{exp}: the result must "
                             "scale with it (no absolute epsilons, no overflow or underflow)", settings,
                             scale=scale, tags=("stress", "scale", "linear-only"), **stress))
    for label, smin in STRESS_SPANS:
        for name in (case_solvers() if label == "1e-7" else ("exact",)):
            out.append(R(f"stress_span_{label}_{name}",
                         f"{solvers[name].label()}; each microbatch's 4 sequence gradients have norms 1 .. "
                         f"{smin:.1e} in random directions: every direction must be kept", solvers[name],
                         sizes=(4, 4, 4), span=tuple(np.geomspace(1.0, smin, 4)), max_tokens=1,
                         tags=("stress", "span", "linear-only"), **stress))
    for label, smin in STRESS_DEPENDENT_SPANS:
        out.append(R(f"stress_dependent_{label}_exact",
                     f"exact PROMA; each microbatch's 4 sequence gradients are nearly dependent, singular values "
                     f"1 .. {smin:.1e}", solvers["exact"], sizes=(4, 4, 4), span=tuple(np.geomspace(1.0, smin, 4)),
                     dependent=True, max_tokens=1, tags=("stress", "span", "ill-conditioned", "linear-only"),
                     **stress))
    exact = solvers["exact"]
    out += [
        R("stress_duplicates", "exact PROMA; microbatch 1 repeats microbatch 0's sequences, microbatch 2 holds "
          "one sequence three times", exact, sizes=(3, 3, 3),
          duplicates=((1, 0, 0, 0), (1, 1, 0, 1), (1, 2, 0, 2), (2, 1, 2, 0), (2, 2, 2, 0)),
          tags=("stress", "duplicates", "rank-deficient", "linear-only"), **stress),
        R("stress_zero_gradient", "Gram-Schmidt PROMA; sequences with no tokens (zero gradient) in every "
          "microbatch, one microbatch entirely zero", solvers["gram_schmidt"], sizes=(3, 2, 3),
          empty=((0, 1), (1, 0), (1, 1), (2, 2)), tags=("stress", "zero-gradient", "linear-only"), **stress),
        R("stress_b_gt_P", "exact PROMA with 6-8 sequences per microbatch, more than gate.weight's 2 "
          "parameters (b > P: the projection removes all of that layer's G)", exact, sizes=(6, 8, 7),
          tags=("stress", "b>P", "linear-only"), **stress),
        R("stress_one_token", "ridge PROMA with one token per sequence (rank-one per-sequence gradients)",
          replace(solvers["ridge"], relative_bound=0.5), sizes=(4, 3, 5), max_tokens=1,
          tags=("stress", "one-token", "linear-only"), **stress),
        R("stress_long_sequence", "exact PROMA with one sequence of 200-256 tokens per microbatch",
          exact, sizes=(1, 1, 1), min_tokens=200, max_tokens=256,
          tags=("stress", "long-sequence", "linear-only"), **stress),
        R("stress_intra_token_rows", "intra, rank 1, two-sided, on a layer with 64 outputs; in every microbatch "
          "one token's output gradient is 1e-17 of the largest (rounding of an exact zero: no direction) and "
          "one's is 2^-19 (data: it defines directions), both with large activations",
          solvers["intra"], sizes=(3, 2, 4), min_tokens=2, planted_rows=PLANTED_TOKEN_ROWS,
          tags=("stress", "intra", "token-rows", "linear-only"), **dict(stress, layers=WIDE_LAYERS)),
    ]
    return out


def _linear_twins(recipes: list) -> list:
    """For every recipe with a non-linear layer, the same draw on single-use linear layers only."""
    return [replace(r, id=f"{r.id}_linear", layers=LINEAR_LAYERS, description=r.description + "; linear layers only",
                    tags=tuple(t for t in r.tags if t != "tied") + ("linear-only",))
            for r in recipes if any(layer.uses != ("linear",) for layer in r.layers)]


def default_recipes() -> list:
    """The default case set: the base recipes, their linear-only twins and the stress recipes."""
    base = _recipes()
    return base + _linear_twins(base) + _stress_recipes()


def synthetic_cases(seed: int = 0) -> list:
    """Every synthetic case (random factors with fixed seeds, expected results from the reference)."""
    return [_draw_case(r, seed) for r in default_recipes()]


def generator_info(seed: int) -> dict:
    import platform

    from . import __version__

    return {"name": "proma-verify cases", "version": __version__, "numpy": np.__version__,
            "python": platform.python_version(), "seed": seed, "reference": "reference.accumulate_history"}
