"""Reading a case directory's ``manifest.json`` (FORMAT.md, "Case directory"): its top level and each entry.

Used by :func:`verification.oracle.format.load_cases`; kept apart so that ``format`` stays one screenful of
names, objects and checks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .format import (_CASE_ID, FORMAT_NAME, MANIFEST, READABLE_VERSIONS, Case, FormatError, Layer, Settings,
                     _is_int, _is_real)


def read_manifest(cases_dir) -> dict:
    """Read and check the top level of ``DIR/manifest.json`` (format name, schema version, tolerances)."""
    path = Path(cases_dir) / MANIFEST
    if not path.is_file():
        raise FormatError(f"{path}: no manifest (is {cases_dir} a case directory made by `proma-verify cases`?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{path}: the manifest must be a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: format must be {FORMAT_NAME!r}; got {manifest.get('format')!r}")
    version = manifest.get("schema_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise FormatError(f"{path}: schema_version {version!r} is not supported (this reader knows "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    tol = manifest.get("tolerances")
    if not isinstance(tol, dict) or not all(
            isinstance(tol.get(d), dict) and _is_real(tol[d].get("rtol")) and _is_real(tol[d].get("atol"))
            for d in ("float64", "float32")):
        raise FormatError(f"{path}: tolerances must give rtol and atol for float64 and float32")
    if not isinstance(manifest.get("cases"), list) or not manifest["cases"]:
        raise FormatError(f"{path}: cases must be a non-empty list")
    return manifest


def case_from_entry(entry, cases_dir: Path, index: int) -> Case:
    """Case ``index`` of a manifest, its archive read (not yet validated: see :func:`format.validate_case`)."""
    where = f"{cases_dir / MANIFEST}: cases[{index}]"
    need = {"id", "file", "description", "settings", "layers", "microbatch_boundaries"}
    if not isinstance(entry, dict) or not need <= set(entry):
        raise FormatError(f"{where}: a case needs the keys {sorted(need)}")
    cid = entry["id"]
    if not isinstance(cid, str) or not _CASE_ID.match(cid):
        raise FormatError(f"{where}: id {cid!r} must match {_CASE_ID.pattern}")
    where = f"case {cid!r}"
    if not isinstance(entry["layers"], list):
        raise FormatError(f"{where}: layers must be a list")
    layers = [Layer.from_json(obj, f"{where}: layers[{k}]") for k, obj in enumerate(entry["layers"])]
    path = cases_dir / entry["file"]
    if not path.is_file():
        raise FormatError(f"{where}: archive {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except Exception as exc:  # zipfile/pickle errors of a damaged archive
        raise FormatError(f"{where}: cannot read {path} ({exc})") from None
    return Case(id=cid, description=str(entry["description"]),
                settings=Settings.from_json(entry["settings"], where), layers=layers,
                boundaries=entry["microbatch_boundaries"], arrays=arrays, tags=list(entry.get("tags", [])))
