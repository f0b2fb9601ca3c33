"""The golden case set: the default cases (synthetic + real) generated once, versioned, checksummed, at hand.

``proma-verify cases --out DIR`` copies a ready set instead of regenerating it:

1. the set shipped with the package (``verification/oracle/golden/``, seed :data:`GOLDEN_SEED`), the fixed
   reference every machine checks against (regenerating on another machine may differ in the last bits of
   LAPACK's results, and the real cases need a 5-minute warm-start);
2. otherwise (another seed, ``--regenerate``) a set generated once and cached under the user's cache directory
   (:func:`cache_root`), keyed by package version, schema version and seed.

Every case has a *digest*: SHA-256 over its manifest entry (without the file name) and its arrays' names,
dtypes, shapes and bytes (not the ``.npz`` bytes, which hold zip timestamps). A written set records them in
its manifest (``generator.digests``); :func:`golden_notes` tells whether a case directory's cases are the
shipped ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import __version__
from .format import MANIFEST, SCHEMA_VERSION, load_cases, save_cases

GOLDEN_DIR = Path(__file__).with_name("golden")
GOLDEN_SEED = 0
# Overrides the cache directory (default: $XDG_CACHE_HOME/proma, else ~/.cache/proma).
CACHE_ENV = "PROMA_CACHE_DIR"
REAL_TAG = "real"


def cache_root() -> Path:
    """The user's cache directory for proma (``$PROMA_CACHE_DIR``, ``$XDG_CACHE_HOME/proma`` or ``~/.cache/proma``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "proma"


def set_key(seed: int) -> str:
    """The cache key of a generated set: package version, schema version, seed."""
    return f"cases-{__version__}-schema{SCHEMA_VERSION}-seed{seed}"


def case_digest(case) -> str:
    """SHA-256 (hex) of a case's manifest entry (less ``file``) and its arrays (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    entry = {k: v for k, v in case.manifest_entry().items() if k != "file"}
    h.update(json.dumps(entry, sort_keys=True).encode())
    for key in sorted(case.arrays):
        a = np.ascontiguousarray(case.arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shipped_digests() -> dict:
    """``{case id: digest}`` of the shipped golden set ({} when the package ships none)."""
    path = GOLDEN_DIR / MANIFEST
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("generator", {}).get("digests", {}))


def golden_notes(cases) -> list:
    """Lines saying whether ``cases`` (loaded) are the shipped golden set's (nothing if none of their ids is)."""
    shipped = shipped_digests()
    known = [c for c in cases if c.id in shipped]
    if not known:
        return []
    differ = [c.id for c in known if case_digest(c) != shipped[c.id]]
    other = [c.id for c in cases if c.id not in shipped]
    if not differ:
        line = f"golden set: {len(known)} cases identical to the shipped set (proma {__version__})"
    else:
        shown = ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
        line = (f"note: {len(differ)} of {len(known)} cases differ from the shipped golden set (proma {__version__}): "
                f"{shown}; `proma-verify cases --out DIR` writes the shipped ones")
    return [line] + ([f"note: {len(other)} cases are not in the shipped set"] if other else [])


def _copy_set(src: Path, out: Path, keep) -> Path:
    """Copy the cases of ``src`` for which ``keep(entry)`` holds into ``out``, with their manifest."""
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["cases"] = [e for e in manifest["cases"] if keep(e)]
    out.mkdir(parents=True, exist_ok=True)
    for entry in manifest["cases"]:
        shutil.copyfile(src / entry["file"], out / entry["file"])
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def write_set(out, cases, generator: dict) -> Path:
    """Save ``cases`` to ``out`` with their digests recorded in the manifest's generator."""
    generator = {**generator, "digests": {c.id: case_digest(c) for c in cases}}
    return save_cases(out, cases, generator=generator)


def default_cases(out, *, seed: int = GOLDEN_SEED, real: bool = True, regenerate: bool = False,
                  make_synthetic=None, make_real=None, log=print) -> Path:
    """Write the default case set to ``out``: shipped, else cached, else generated (and cached).

    Parameters
    ----------
    out : path
        Case directory to write.
    seed : int
        Seed of the synthetic factors and of the real microbatch; the shipped set is seed :data:`GOLDEN_SEED`.
    real : bool
        Include the real cases (tag ``"real"``).
    regenerate : bool
        Generate again (and refresh the cache) instead of copying.
    make_synthetic, make_real : callable(seed) -> list of Case
        Generators (the oracle's synthetic cases; the real ones come from :mod:`verification.realcase`, which
        the oracle does not import). ``make_real`` is needed only when the real cases are generated.

    Returns
    -------
    Path of the written manifest.
    """
    out = Path(out)
    keep = (lambda e: True) if real else (lambda e: REAL_TAG not in e.get("tags", ()))
    if not regenerate and seed == GOLDEN_SEED and shipped_digests():
        log(f"copying the shipped golden set (proma {__version__}, seed {seed})")
        return _copy_set(GOLDEN_DIR, out, keep)
    cached = cache_root() / set_key(seed)
    has_real = cached.is_dir() and (cached / MANIFEST).is_file() and any(
        REAL_TAG in e.get("tags", ()) for e in json.loads((cached / MANIFEST).read_text())["cases"])
    if regenerate or not (cached / MANIFEST).is_file() or (real and not has_real):
        _generate_into(cached, seed, real, make_synthetic, make_real, log)
    else:
        log(f"copying the cached set {cached}")
    return _copy_set(cached, out, keep)


def _generate_into(cached: Path, seed: int, real: bool, make_synthetic, make_real, log) -> None:
    """Generate the set and put it at ``cached`` (written aside first, so a failed run leaves no half set)."""
    from .cases import generator_info, synthetic_cases

    log(f"generating the case set (seed {seed}) into the cache {cached}")
    cases = (make_synthetic or synthetic_cases)(seed)
    if real:
        if make_real is None:
            raise ValueError("real cases requested but no generator of real cases was given (make_real)")
        cases += make_real(seed)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
    write_set(tmp, cases, generator_info(seed))
    if cached.exists():
        shutil.rmtree(cached)
    tmp.rename(cached)
