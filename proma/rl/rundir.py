"""The run directory: ``config.json``, the JSONL logs and the ``ckpt.pt`` resume point, owned by one writer.

A run directory holds one configuration; resuming it with a different one (outside ``RESUMABLE_CHANGES``)
is refused. Records written after the checkpoint are dropped on resume, since the resumed run redoes them.

Nothing is lost or silently wrong:

- one writer: :func:`lock_run_dir` takes an OS lock (``fcntl.flock`` on ``<out>/.lock``) that a second process
  cannot take (refused naming the directory and the holder's pid); the OS releases it when the holder exits,
  SIGKILL included, so no stale lock is left behind;
- files that are rewritten (``config.json``, a log cut back on resume, ``ckpt.pt``) are written to a temporary
  file, fsynced and renamed over the old one (:func:`write_atomic`): a crash leaves the old or the new file;
- a torn last line of a log (a crash mid-append) is skipped with a warning; a damaged line before it is an error;
- logs beside a missing or unreadable ``ckpt.pt`` are refused, naming what to restore or delete, instead of a
  silent restart from step 0 that would cut them.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import warnings
from pathlib import Path

from .config import RESUMABLE_CHANGES, TrainConfig

LOCK_FILE = ".lock"
CKPT_FILE = "ckpt.pt"
LOG_FILES = ("metrics.jsonl", "eval.jsonl")
# run directories locked by this process: {resolved path: open lock file} (the lock lives as long as the file)
_HELD: dict = {}


# ------------------------------------------------------------------------------------------- one writer
def lock_run_dir(run_dir: Path) -> None:
    """Make this process the run directory's only writer until it exits.

    Re-entrant within one process (a resumed run in the same process keeps its lock). The lock is
    ``fcntl.flock`` on ``<run_dir>/.lock``, which holds the owner's pid for the message of the refused one.

    Raises
    ------
    ValueError naming the directory and the pid of the process that holds it.
    """
    import fcntl

    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        return
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"out={str(run_dir)!r}: run directory {run_dir} is in use by another process (pid {holder}); "
                         f"wait for it to finish or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[key] = f


@atexit.register
def _release_all() -> None:
    """Close the lock files still held at exit (the OS would release them anyway; this keeps exit quiet)."""
    while _HELD:
        _HELD.popitem()[1].close()


def unlock_run_dir(run_dir: Path) -> None:
    """Release this process's lock on ``run_dir`` (no-op when it holds none)."""
    f = _HELD.pop(Path(run_dir).resolve(), None)
    if f is not None:
        f.close()  # closing the file releases the flock


@contextlib.contextmanager
def owned_while_running(run_dir):
    """Release on exit the lock that the block took on ``run_dir`` (if it was not held before): a process that
    trains several runs (a worker of a pool) does not keep a finished or failed run's directory from another."""
    held_before = Path(run_dir).resolve() in _HELD
    try:
        yield
    finally:
        if not held_before:
            unlock_run_dir(run_dir)


# --------------------------------------------------------------------------------------- atomic writes
def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: temporary file, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """``config.json``, written atomically."""
    write_atomic(Path(run_dir) / "config.json", cfg.to_json())


# -------------------------------------------------------------------------------------------------- logs
def append_jsonl(path: Path, record: dict):
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path) -> list:
    """The records of a JSONL log ([] when it does not exist).

    A last line that is not valid JSON (torn by a crash mid-append) is skipped with a warning; an invalid line
    before the last is a ValueError naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipping a torn last line {i + 1} ({len(line)} characters: {exc})",
                              stacklevel=2)
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc}); the log is damaged before its "
                             f"last line: restore it or delete the run directory") from None
    return records


def truncate_jsonl(path: Path, before_step: int):
    """Keep only records of steps < before_step (records written after the checkpoint are redone).

    Rewritten atomically: a crash during the rewrite leaves the old log, never a partial one.
    """
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_records(path) if r["step"] < before_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


# ----------------------------------------------------------------------------------------------- config
def check_same_config(run_dir: Path, cfg: TrainConfig):
    """ValueError naming the first option in which ``cfg`` differs from the run saved in ``run_dir``."""
    path = Path(run_dir) / "config.json"
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"out={cfg.out!r}: {path} is not valid JSON ({exc}); restore it or delete the run "
                         f"directory") from None
    new = cfg.to_dict()
    defaults = TrainConfig.from_preset(cfg.preset).to_dict()
    # a field missing from the saved config was added later: it matches when it keeps its default
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new[k]]
    if diff:
        k = diff[0]
        raise ValueError(
            f"out={cfg.out!r}: run directory holds a run with a different config ({k}: {old.get(k)!r} there, "
            f"{new[k]!r} now); choose another --out or delete it"
        )


# ------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(run_dir: Path, model, opt, next_step: int, opt_step: int):
    """Write ``ckpt.pt`` atomically (a crash mid-write leaves the previous checkpoint)."""
    import torch

    tmp = run_dir / f"{CKPT_FILE}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "next_step": next_step,
                    "opt_step": opt_step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / CKPT_FILE)
    _fsync_dir(run_dir)


def _logged_records(run_dir: Path) -> dict:
    """``{log file name: number of records}`` of the logs that hold any."""
    counts = {name: len(read_records(run_dir / name)) for name in LOG_FILES}
    return {name: n for name, n in counts.items() if n}


def load_checkpoint(run_dir: Path, model, opt, device) -> tuple[int, int] | None:
    """Load ``ckpt.pt`` into ``model`` and ``opt``; returns ``(next_step, opt_step)``, or None for a new run.

    Raises
    ------
    ValueError when ``ckpt.pt`` is missing but ``metrics.jsonl`` holds records (a restart from step 0 would cut
    them), or when ``ckpt.pt`` cannot be read; the message says what to restore or delete.
    """
    import torch

    run_dir = Path(run_dir)
    path = run_dir / CKPT_FILE
    if not path.exists():
        # eval.jsonl alone may hold step 0's evaluation of a run stopped before its first step: redone as it was
        logged = _logged_records(run_dir)
        if "metrics.jsonl" in logged:
            held = ", ".join(f"{name} ({n} records)" for name, n in logged.items())
            raise ValueError(f"{run_dir}: {held} but no {CKPT_FILE} to resume from; restore {path}, or delete "
                             f"{', '.join(logged)} (or the whole directory) to start the run again")
        return None
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        return ck["next_step"], ck["opt_step"]
    except Exception as exc:  # truncated / empty / foreign file: PytorchStreamReader, EOFError, KeyError ...
        raise ValueError(f"{path}: cannot resume from this checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); restore it from a copy, or delete "
                         f"{run_dir} (or its {CKPT_FILE} and logs) to start the run again") from None
