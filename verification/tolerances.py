"""Named numerical tolerances, one place for every test and check (no literals scattered in tests).

Use ``rtol`` with a scale: ``|a - b| <= RTOL * max(scale, tiny)`` where ``scale`` is the size of the inputs
(e.g. ``||g_i|| * ||G||`` for an inner product), or ``numpy.testing.assert_allclose(a, b, rtol, atol)``.

FLOAT64_RTOL / FLOAT64_ATOL   float64 computations that agree up to rounding (reference vs brute force,
                              torch float64 vs reference). Rounding is ~1e-16 per operation; 1e-9 leaves
                              room for accumulation over sizes used in tests and mild ill-conditioning.
FLOAT32_RTOL / FLOAT32_ATOL   torch float32 vs the float64 reference (eps32 ~ 1.2e-7, x ~1e3 headroom).
                              The oracle's pass test (verification/FORMAT.md) uses the RTOLs relative to each
                              array's own scale and the ATOLs only as the floor where that scale is 0.
REFERENCE_ATOL                absolute floor for float64 identities whose exact value is 0 (orthogonality
                              residuals, g_i . P(G)), applied to unit-scale inputs (multiply by the scale).
CONVERGENCE_RTOL              iterative approximations that converge to the exact result (Gram-Schmidt with
                              many passes, ridge -> 0): limited by the iteration, not by rounding.
"""
FLOAT64_RTOL = 1e-9
FLOAT64_ATOL = 1e-12
FLOAT32_RTOL = 1e-4
FLOAT32_ATOL = 1e-6
REFERENCE_ATOL = 1e-10
CONVERGENCE_RTOL = 1e-6

