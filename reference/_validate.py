"""Input checks shared by the reference modules.

Every public function of :mod:`reference` converts its array arguments with :func:`as_array`, so bad input
fails early with a ``ValueError`` that names the argument, instead of surfacing later as a NaN or as a
broadcasting accident.
"""
from __future__ import annotations

import numbers

import numpy as np


def as_array(x, name: str, *, ndim=None, finite: bool = True) -> np.ndarray:
    """Return ``x`` as a float64 array, checking its kind, dimensionality and finiteness.

    Parameters
    ----------
    x : array_like
        Real numbers (bool and integer arrays are accepted and converted).
    name : str
        Argument name quoted in error messages.
    ndim : int or tuple of int, optional
        Allowed number(s) of dimensions.
    finite : bool
        Reject NaN and +-inf when true.
    """
    try:
        raw = np.asarray(x)
    except Exception as exc:  # ragged nested lists and the like
        raise ValueError(f"{name} must be an array of real numbers; got {type(x).__name__} ({exc})") from exc
    if raw.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers; got dtype {raw.dtype}")
    arr = raw.astype(np.float64, copy=False)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}; got shape {arr.shape}")
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def as_index_array(x, name: str, *, length: int, upper: int) -> np.ndarray:
    """Return ``x`` as a 1-D int64 array of ``length`` entries, each in ``[0, upper)``."""
    raw = np.asarray(x)
    if raw.dtype.kind not in "iu":
        if raw.dtype.kind == "f" and raw.size and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)):
            raw = raw.astype(np.int64)
        elif raw.size == 0 and raw.dtype.kind in "f":
            raw = raw.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integers; got dtype {raw.dtype}")
    if raw.ndim != 1 or raw.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},); got shape {raw.shape}")
    idx = raw.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= upper):
        raise ValueError(f"{name} entries must lie in [0, {upper}); got range [{idx.min()}, {idx.max()}]")
    return idx


def as_int(x, name: str, *, minimum: int) -> int:
    """Return ``x`` as a Python int >= ``minimum`` (bools are rejected)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be an integer; got {x!r}")
    if int(x) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {int(x)}")
    return int(x)


def as_real(x, name: str, *, minimum=None, strict: bool = False) -> float:
    """Return ``x`` as a finite float, optionally ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {x!r}")
    value = float(x)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}; got {value}")
    return value
