"""The run directory loses nothing and is never silently wrong: one writer (an OS lock that dies with its
process), atomic rewrites, torn last lines, missing or damaged checkpoints beside logs, one writer's log in
``proma summary``."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import proma
from proma.rl.config import TrainConfig
from proma.rl.distributed import Ranks
from proma.rl.rundir import load_checkpoint, read_records, save_checkpoint, truncate_jsonl, unlock_run_dir
from proma.rl.summary import markdown_table

ROOT = Path(proma.__file__).resolve().parent.parent
# seconds a helper process may take to build the smoke run (tokenizer + warm-start, cached after the first)
HELPER_START_S = 240


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _quiet(*args, **kwargs):
    pass


def _records(n, *, start=0):
    return [{"step": start + i // 2, "opt_step": start * 2 + i + 1, "minibatch": i % 2, "reward": 0.5} for i in range(n)]


def _write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ----------------------------------------------------------------------------------------------- one writer
HOLDER = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
import proma.rl.train as T
from proma.rl.config import TrainConfig
from proma.rl.distributed import Ranks
# the run's parts stubbed (a tiny model): the run directory's handling is what is under test
T.build_run = lambda cfg, log: SimpleNamespace(model=torch.nn.Linear(2, 2), device=torch.device("cpu"),
                                               run_dir=Path(cfg.out))
cfg = TrainConfig.from_preset("smoke", out=sys.argv[1], cache_dir=sys.argv[2])
T.open_run(cfg, Ranks(), lambda *a, **k: None)
print("ready", flush=True)
time.sleep(600)
"""


def _stub_build_run(cfg, log):
    from types import SimpleNamespace

    return SimpleNamespace(model=torch.nn.Linear(2, 2), device=torch.device("cpu"), run_dir=Path(cfg.out))


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, monkeypatch):
    import proma.rl.train as T

    monkeypatch.setattr(T, "build_run", _stub_build_run)
    out, cache = tmp_path / "run", tmp_path / "cache"
    cfg = TrainConfig.from_preset("smoke", out=str(out), cache_dir=str(cache))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + HELPER_START_S
        line = holder.stdout.readline()
        assert line.strip() == "ready", (line, holder.stderr.read() if holder.poll() is not None else "")
        assert time.monotonic() < deadline
        # the same configuration (old code: both "resume" the same directory and write every record twice)
        with pytest.raises(ValueError, match=rf"run directory {out} is in use by another process \(pid {holder.pid}\)"):
            T.open_run(cfg, Ranks(), _quiet)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    # SIGKILL released the OS lock: the directory is usable at once, no stale lock to delete
    try:
        parts, _, start, _ = T.open_run(cfg, Ranks(), _quiet)
        assert start == 0 and parts.run_dir == out
    finally:
        unlock_run_dir(out)


def test_summary_refuses_a_log_written_by_two_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(TrainConfig.from_preset("smoke", method="grpo").to_json())
    once = _records(4)
    _write_log(run / "metrics.jsonl", once)
    assert "| grpo |" in markdown_table([run])
    _write_log(run / "metrics.jsonl", [r for r in once for _ in range(2)])  # every record written twice
    with pytest.raises(ValueError, match="metrics.jsonl: record 2 has opt_step 1, expected 2"):
        markdown_table([run])


# --------------------------------------------------------------------------------------------- atomic rewrites
KILLED_MID_WRITE = """
import builtins, io, os, signal, sys
from proma.rl.rundir import truncate_jsonl

real_open = builtins.open


class Dying:
    # writes half of what it is given, then the process is SIGKILLed
    def __init__(self, f):
        self.f = f

    def write(self, s):
        self.f.write(s[: len(s) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def dying_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return Dying(f) if "metrics.jsonl" in str(file) and mode[0] in "wa" else f


builtins.open = io.open = dying_open
truncate_jsonl(sys.argv[1], int(sys.argv[2]))
"""


def test_sigkill_while_a_resume_cuts_the_log_leaves_it_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, _records(2000))
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(path), "500"], env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before  # the old log, not a half-written (or empty) one
    truncate_jsonl(path, 500)           # and the cut, done without a crash, keeps exactly steps < 500
    assert read_records(path) == _records(1000)


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, _records(6))
    with path.open("a") as f:
        f.write('{"step": 3, "opt_st')  # a crash mid-append
    with pytest.warns(UserWarning, match="torn last line 7"):
        assert read_records(path) == _records(6)
    with pytest.warns(UserWarning, match="torn last line"):
        truncate_jsonl(path, 2)
    assert read_records(path) == _records(4)
    # a damaged line before the last is no crash artefact: refused, naming the file and the line
    _write_log(path, _records(3))
    path.write_text(path.read_text().replace('"reward"', 'reward', 1))
    with pytest.raises(ValueError, match="metrics.jsonl: line 1 is not valid JSON"):
        read_records(path)


# ------------------------------------------------------------------------------------------------ checkpoints
def _model_and_optimizer():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.Adam(model.parameters())


def test_missing_checkpoint_beside_logs_is_refused_not_restarted(tmp_path):
    model, opt = _model_and_optimizer()
    assert load_checkpoint(tmp_path, model, opt, "cpu") is None  # a new run
    _write_log(tmp_path / "eval.jsonl", [{"step": 0, "val/accuracy": 0.1}])
    assert load_checkpoint(tmp_path, model, opt, "cpu") is None  # stopped before its first step: redone
    _write_log(tmp_path / "metrics.jsonl", _records(6))
    with pytest.raises(ValueError, match=r"metrics.jsonl \(6 records\), eval.jsonl \(1 records\) but no ckpt.pt "
                                         r"to resume from; restore .*ckpt.pt, or delete metrics.jsonl, eval.jsonl"):
        load_checkpoint(tmp_path, model, opt, "cpu")
    assert len(read_records(tmp_path / "metrics.jsonl")) == 6


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_a_damaged_checkpoint_is_refused_naming_it(tmp_path, damage):
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, model, opt, 3, 6)
    assert load_checkpoint(tmp_path, model, opt, "cpu") == (3, 6)
    path = tmp_path / "ckpt.pt"
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=rf"{path}: cannot resume from this checkpoint .*restore it from a copy, "
                                         rf"or delete {tmp_path}"):
        load_checkpoint(tmp_path, model, opt, "cpu")


@pytest.mark.slow
def test_train_refuses_a_run_whose_checkpoint_was_lost(tmp_path):
    from proma.rl.train import train

    cfg = TrainConfig.from_preset("smoke", out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), steps=1)
    run_dir = train(cfg, log=_quiet)
    logged = (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "ckpt.pt").unlink()
    with pytest.raises(ValueError, match="no ckpt.pt to resume from"):
        train(cfg.replace(steps=2), log=_quiet)
    assert (run_dir / "metrics.jsonl").read_bytes() == logged
    unlock_run_dir(run_dir)


# -------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("option, value", [
    ("adv_eps", -1.0), ("adv_eps", -0.5), ("adv_eps", float("nan")), ("grad_clip", -1.0), ("grad_clip", float("inf")),
    ("weight_decay", -0.1), ("num_heads", 0), ("num_heads", 3), ("num_kv_heads", 0), ("adam_beta1", 1.5),
    ("adam_beta1", 1.0), ("adam_beta2", -0.1), ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0),
    ("warmstart_lr", float("inf")), ("temperature", float("inf")), ("format_reward", float("nan")),
    ("hidden_size", 0), ("intermediate_size", 0), ("num_layers", 0), ("max_positions", 0), ("steps", 2.5),
])
def test_every_bad_option_is_refused_naming_it(option, value):
    with pytest.raises(ValueError, match=rf"option --{option.replace('_', '-')}\)"):
        TrainConfig.from_preset("smoke", **{option: value})


@pytest.mark.parametrize("args, message", [
    (["--adv-eps", "-1"], "adv_eps=-1.0: must be a finite number >= 0 (option --adv-eps)"),
    (["--grad-clip", "-1"], "grad_clip=-1.0: must be a finite number >= 0"),
    (["--num-heads", "0"], "num_heads=0: must be an integer >= 1 (option --num-heads)"),
    (["--adam-beta1", "1.5"], "adam_beta1=1.5: must be in [0, 1) (option --adam-beta1)"),
    (["--lr", "inf"], "lr=inf: must be a finite number > 0 (option --lr)"),
])
def test_bad_options_exit_2_at_parse_time(tmp_path, capsys, args, message):
    from proma.rl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--smoke", "--out", str(tmp_path / "x"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_run_releases_the_lock_when_it_ends_even_on_error(tmp_path, monkeypatch):
    """``proma.rl.run`` (what process-pool workers call) gives the directory back when the run ends, so another
    process can resume a run that failed in a worker that is still alive."""
    import proma.rl.train as T
    from proma.rl import run
    from proma.rl.rundir import _HELD, lock_run_dir

    out = tmp_path / "run"
    out.mkdir()

    def failing(cfg, *, log=print):
        lock_run_dir(Path(cfg.out))
        raise RuntimeError("boom")

    monkeypatch.setattr(T, "train", failing)
    with pytest.raises(RuntimeError, match="boom"):
        run(TrainConfig.from_preset("smoke", out=str(out)))
    assert out.resolve() not in _HELD
    probe = subprocess.run([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / ".lock")], env=_env())
    assert probe.returncode == 0   # another process can take it
