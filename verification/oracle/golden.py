"""The golden case set: the default cases (synthetic + real) generated once, versioned, checksummed, at hand.

``proma-verify cases --out DIR`` copies ready cases instead of regenerating them:

- the **synthetic** cases of seed :data:`GOLDEN_SEED` ship with the package (``verification/oracle/golden/``,
  1.7 MB): the fixed reference every machine checks against, identical everywhere;
- the **real** cases (three 5.8 MB archives of the same captured microbatch, too large to ship) are generated
  once per machine, after a 5-minute warm-start, and kept under the user's cache directory (:func:`cache_root`),
  keyed by package version, schema version and seed; so are the synthetic cases of any other seed, and
  ``--regenerate`` rebuilds both into the cache.

Every case has a *digest*: SHA-256 over its manifest entry (without the file name) and its arrays' names,
dtypes, shapes and bytes (not the ``.npz`` bytes, which hold zip timestamps). ``golden/digests.json`` holds the
digests of the whole default set (real cases included, as generated when the set was made);
:func:`golden_notes` (printed by ``proma-verify check``) says which cases of a directory differ from them.
Regenerate the shipped set with ``python -m verification.oracle.golden`` after changing the reference or the
recipes (``tests/verification/test_golden.py`` fails until then).
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
DIGESTS = GOLDEN_DIR / "digests.json"
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
    """``{case id: digest}`` of the default set as shipped ({} when the package ships none)."""
    return dict(json.loads(DIGESTS.read_text())["cases"]) if DIGESTS.is_file() else {}


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
        line = (f"note: {len(differ)} of {len(known)} cases differ from the shipped golden set's checksums "
                f"(proma {__version__}): {shown}; real cases regenerated on another machine may differ in their "
                "last bits, synthetic ones should not (`proma-verify cases --out DIR` copies the shipped ones)")
    return [line] + ([f"note: {len(other)} cases are not in the shipped set"] if other else [])


def write_set(out, cases, generator: dict) -> Path:
    """Save ``cases`` to ``out`` with their digests recorded in the manifest's generator."""
    generator = {**generator, "digests": {c.id: case_digest(c) for c in cases}}
    return save_cases(out, cases, generator=generator)


def default_cases(out, *, seed: int = GOLDEN_SEED, real: bool = True, regenerate: bool = False,
                  make_synthetic=None, make_real=None, log=print) -> Path:
    """Write the default case set to ``out`` from the shipped or cached cases, generating what is missing.

    Parameters
    ----------
    out : path
        Case directory to write.
    seed : int
        Seed of the synthetic factors and of the real microbatch; the shipped cases are seed :data:`GOLDEN_SEED`.
    real : bool
        Include the real cases (tag ``"real"``).
    regenerate : bool
        Generate again into the cache instead of copying.
    make_synthetic, make_real : callable(seed) -> list of Case
        Generators: default the oracle's synthetic cases; the real ones come from :mod:`verification.studies.realcase`,
        which the oracle does not import (needed only when the real cases are not cached).

    Returns
    -------
    Path of the written manifest.
    """
    from .cases import synthetic_cases

    cached = cache_root() / set_key(seed)
    if seed == GOLDEN_SEED and not regenerate and (GOLDEN_DIR / MANIFEST).is_file():
        log(f"synthetic cases: the shipped golden set (proma {__version__}, seed {seed})")
        sources = [GOLDEN_DIR]
    else:
        sources = [_ensure(cached / "synthetic", seed, make_synthetic or synthetic_cases, regenerate, log)]
    if real:
        if make_real is None and not (cached / "real" / MANIFEST).is_file():
            raise ValueError("real cases requested but none are cached and no generator was given (make_real)")
        sources.append(_ensure(cached / "real", seed, make_real, regenerate, log))
    return _merge(sources, Path(out))


def _ensure(where: Path, seed: int, make, regenerate: bool, log) -> Path:
    """``where`` holding the set ``make(seed)``: kept if there, else generated (aside, then moved in place)."""
    from .cases import generator_info

    if (where / MANIFEST).is_file() and not regenerate:
        log(f"cached cases: {where}")
        return where
    log(f"generating cases (seed {seed}) into the cache {where}")
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=where.name + ".", dir=where.parent))
    write_set(tmp, make(seed), generator_info(seed))
    if where.exists():
        shutil.rmtree(where)
    tmp.rename(where)
    return where


def _merge(sources: list, out: Path) -> Path:
    """Copy the cases of every source directory into ``out`` under one manifest (the first one's header)."""
    manifests = [json.loads((src / MANIFEST).read_text()) for src in sources]
    merged = dict(manifests[0], cases=[])
    merged["generator"] = dict(merged.get("generator", {}), digests={})
    out.mkdir(parents=True, exist_ok=True)
    for src, manifest in zip(sources, manifests):
        merged["cases"] += manifest["cases"]
        merged["generator"]["digests"].update(manifest.get("generator", {}).get("digests", {}))
        for entry in manifest["cases"]:
            shutil.copyfile(src / entry["file"], out / entry["file"])
    path = out / MANIFEST
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return path


def refresh_shipped(full_set_dir=None, *, seed: int = GOLDEN_SEED) -> None:
    """Rewrite ``golden/`` (the synthetic cases) and ``golden/digests.json`` (the synthetic cases and, from
    ``full_set_dir`` when given, the real ones)."""
    from .cases import generator_info, synthetic_cases

    cases = synthetic_cases(seed)
    if GOLDEN_DIR.exists():
        shutil.rmtree(GOLDEN_DIR)
    write_set(GOLDEN_DIR, cases, generator_info(seed))
    digests = {c.id: case_digest(c) for c in cases}
    if full_set_dir is not None:
        digests.update({c.id: case_digest(c) for c in load_cases(full_set_dir)[0] if REAL_TAG in c.tags})
    DIGESTS.write_text(json.dumps({"proma": __version__, "schema_version": SCHEMA_VERSION, "seed": seed,
                                   "cases": digests}, indent=2) + "\n")


if __name__ == "__main__":
    import sys

    refresh_shipped(sys.argv[1] if len(sys.argv) > 1 else None)
