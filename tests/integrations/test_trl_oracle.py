"""Oracle cases written from PromaGRPOTrainer runs (``proma_oracle_dir`` / ``verification.oracle.trl``): the
full tiny Qwen3, the same with LoRA adapters (PEFT), and LoRA under ``torchrun --nproc_per_node 2`` (gloo, CPU)
with sync "local" (one case per rank) and "global" (the union microbatches, written by rank 0).

Every case must pass ``check --impl torch`` (our accumulator, float64), and the trainer's own float32 gradient
before the optimizer step must match the case's expected result from the NumPy reference.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer  # noqa: E402
from trl_lora_ranks import LORA  # noqa: E402
from verification.trl_testkit import config, run  # noqa: E402
from verification import check_callable, load_cases  # noqa: E402
from verification.oracle.impls import run_torch  # noqa: E402
from verification.oracle.trl import OracleCaseWriter  # noqa: E402
from verification.testkit import free_port  # noqa: E402
from verification.tolerances import FLOAT32_RTOL  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORLD = 2
MEGABYTE = 2 ** 20
# the writer prints sizes in MB with 2 decimals
PRINTED_MB_ATOL = 0.005
# relative change of the candidate's outputs that the oracle must reject
PERTURBATION = 1e-3
# prompts of different token lengths (4, 5, 6, 7, 8, 10, 13, 19 tokens): whichever two a step draws, the
# shorter one is left-padded
RAGGED_PROMPTS = ["1+2=", "5+6=3", "3+4= 5", "the answer 7+8=", "the answer is 2*3=", "the answer is 3 4*5=",
                  "the answer is 7 11 6-1=", "the answer is 7 11 12 30 9-3="]
# a child torchrun with two ranks importing trl, 2 x 2 short runs
TORCHRUN_TIMEOUT_S = 300


def _expected(cases_dir) -> dict:
    """{layer name: G_out after the last microbatch} of the one case in ``cases_dir``."""
    (case,), _ = load_cases(cases_dir)
    last = case.n_microbatches - 1
    return {layer.name: case.array(f"mb{last}/layer{k}/G_out") for k, layer in enumerate(case.layers)}


def _assert_matches(grads: dict, want: dict) -> None:
    for name, g in want.items():
        got = grads[name].numpy() if torch.is_tensor(grads[name]) else grads[name]
        assert np.linalg.norm(got - g) <= FLOAT32_RTOL * np.linalg.norm(g), name


def _removed_ratio(cases_dir) -> float:
    """||R|| / ||pg|| of the last microbatch over every layer, from the case's float64 arrays (R = G_in + pg - G_out,
    shrinkage 1)."""
    (case,), _ = load_cases(cases_dir)
    m = case.n_microbatches - 1
    removed2 = incoming2 = 0.0
    for k in range(len(case.layers)):
        G_in, pg, G_out = (case.array(f"mb{m}/layer{k}/{name}") for name in ("G_in", "pg", "G_out"))
        removed2 += float(((G_in + pg - G_out) ** 2).sum())
        incoming2 += float((pg ** 2).sum())
    return float(np.sqrt(removed2 / incoming2))


@pytest.mark.slow
def test_oracle_cases_from_the_first_step(tokenizer, policy, tmp_path, capsys):
    """Cases written from TRL's microbatches: our torch accumulator passes them, a perturbed one fails, the
    trainer's own (float32, checkpointed) PROMA gradient matches the reference's expected result, the
    logged proma/removed_ratio is the case's microbatch-2 ratio, and the size printed for each microbatch
    before the capture is the size of its arrays in the case."""
    cases_dir = tmp_path / "cases"
    trainer, grads = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "run", proma_oracle_dir=str(cases_dir)),
                         tokenizer, copy.deepcopy(policy))
    check_callable(cases_dir, run_torch).raise_if_failed()
    perturbed = check_callable(cases_dir, lambda case: [[np.asarray(G) * (1 + PERTURBATION) for G in mb]
                                                        for mb in run_torch(case)])
    assert not perturbed.ok
    (case,), _ = load_cases(cases_dir)
    assert case.n_microbatches == 2 and case.settings.variant == "proma"
    _assert_matches(grads, _expected(cases_dir))
    logged = trainer.state.log_history[0]["proma/removed_ratio"]
    assert logged == pytest.approx(_removed_ratio(cases_dir), rel=FLOAT32_RTOL)
    printed = [float(re.search(r"about ([0-9.]+) MiB", line).group(1))
               for line in capsys.readouterr().out.splitlines() if line.startswith("oracle case microbatch")]
    stored = [sum(case.array(key).nbytes for key in case.arrays if key.startswith(f"mb{m}/")) / MEGABYTE
              for m in range(case.n_microbatches)]
    assert len(printed) == case.n_microbatches
    assert np.allclose(printed, stored, rtol=0, atol=PRINTED_MB_ATOL), (printed, stored)


def test_lora_case_holds_the_adapters_restricted_to_named_ones(tokenizer, policy, tmp_path):
    """A PEFT model (TRL patches the base model's forward with its fused head): the case's layers are the
    trainable LoRA tensors named by ``params``, it passes check --impl torch, matches the trainer's gradient,
    and the size estimate is printed before the case is written."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(policy), LoraConfig(**LORA))
    lines = []
    writer = OracleCaseWriter(tmp_path / "cases", params=["*q_proj.lora_*"], log=lines.append)
    _, grads = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "run"), tokenizer, model, callbacks=[writer])
    want = _expected(tmp_path / "cases")
    lora_q = sorted(n for n, p in model.named_parameters() if p.requires_grad and "q_proj" in n)
    assert sorted(want) == lora_q and len(lora_q) == 4   # lora_A, lora_B of 2 layers
    assert all(np.linalg.norm(g) > 0 for g in want.values())
    check_callable(tmp_path / "cases", run_torch).raise_if_failed()
    _assert_matches(grads, want)
    assert [line.split(":")[0] for line in lines] == ["oracle case microbatch 0", "oracle case microbatch 1",
                                                      "oracle case trl_grpo_proma_exact"]
    assert "MiB float64" in lines[0] and "written to" in lines[-1]


def test_eager_attention_with_left_padded_prompts(tokenizer, policy, tmp_path):
    """Prompts of different lengths are left-padded; with HF's eager attention (softmax taken in float32) a
    float64 copy would spread NaN from the padding queries. The case is finite and passes."""
    model = copy.deepcopy(policy)
    model.set_attn_implementation("eager")
    cases_dir = tmp_path / "cases"
    _, grads = run(PromaGRPOTrainer, config(PromaGRPOConfig, tmp_path / "run", proma_oracle_dir=str(cases_dir)),
                   tokenizer, model, prompts=RAGGED_PROMPTS)
    (case,), _ = load_cases(cases_dir)
    assert len({len(tokenizer(p)["input_ids"]) for p in RAGGED_PROMPTS}) == len(RAGGED_PROMPTS)
    check_callable(cases_dir, run_torch).raise_if_failed()
    _assert_matches(grads, _expected(cases_dir))


def test_oracle_params_matching_nothing_fail(tokenizer, policy, tmp_path):
    args = config(PromaGRPOConfig, tmp_path / "run", proma_oracle_dir=str(tmp_path / "cases"),
                  proma_oracle_params=["*lora*"])
    with pytest.raises(ValueError, match=r"proma_oracle_params: \['\*lora\*'\] match no"):
        run(PromaGRPOTrainer, args, tokenizer, copy.deepcopy(policy))


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_cases_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2`` of a LoRA user script (trl_lora_ranks.py): sync "local" writes one case
    per rank, whose mean G_out is the averaged gradient both ranks step with; sync "global" writes one case of
    the union microbatches whose G_out is the gradient of each rank; every case passes check --impl torch."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={free_port()}",
           str(HERE / "trl_lora_ranks.py"), str(tmp_path), "local", "global"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [tmp_path / "local" / "cases" / f"rank{r}" for r in range(WORLD)]
    for cases_dir in ranks + [tmp_path / "global" / "cases"]:
        check_callable(cases_dir, run_torch).raise_if_failed()
    per_rank = [_expected(d) for d in ranks]
    (global_case,), _ = load_cases(tmp_path / "global" / "cases")
    assert global_case.boundaries[-1] == sum(load_cases(d)[0][0].boundaries[-1] for d in ranks)
    for sync, want in (("local", {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}),
                       ("global", _expected(tmp_path / "global" / "cases"))):
        grads = [torch.load(tmp_path / sync / f"grads{r}.pt") for r in range(WORLD)]
        assert sorted(want) == sorted(grads[0]) and len(want) == 8   # LoRA A, B of q, v in 2 layers
        for g in grads:
            _assert_matches(g, want)
        logs = [torch.load(tmp_path / sync / f"logs{r}.pt")[0] for r in range(WORLD)]
        assert logs[0]["proma/removed_ratio"] == logs[1]["proma/removed_ratio"] > 0   # mean over ranks
    assert "oracle case rank 0/2: microbatch 0" in done.stdout
