"""Step time and peak memory of ProjectedAccumulator against plain accumulation and the naive approach.

Usage::

    python benchmarks/bench_accumulator.py                    # full table -> stdout (markdown)
    python benchmarks/bench_accumulator.py --out reports/benchmarks.md
    python benchmarks/bench_accumulator.py --quick            # fewer repeats, smaller layer set

What is measured (all on CPU, ``torch.set_num_threads(--threads)``, float32):

- *small Qwen3*: ``transformers`` ``Qwen3ForCausalLM``, hidden 256, 4 layers, 4 heads of 64 (2 KV heads),
  MLP 768, vocabulary 512, tied embeddings (the harness's small-policy shape); an optimizer step of
  ``--microbatches`` microbatches of ``--b`` sequences of ``--T`` tokens, random lengths (right padding),
  seq_logp = sum of next-token log-probabilities.
- *single linear layers* of Qwen3-0.6B shapes (in -> out): 1024->2048 (q_proj), 1024->1024 (k/v_proj),
  2048->1024 (o_proj), 1024->3072 (gate/up_proj), 3072->1024 (down_proj); seq_logp_i = sum_t <y_t, r_t>
  with fixed random r (so D = r), same microbatch layout.

Methods: ``plain`` = ``ProjectedAccumulator(variant="none")`` (i.e. ``(w * seq_logp).sum().backward()``),
``proma/<solver>`` (``strategy="auto"`` unless named), ``intra`` (rank 1, two-sided), and ``naive``: per
microbatch, b per-sequence backward passes of the whole model (``torch.autograd.grad(seq_logp[i],
params)``), gradients flattened per parameter (b, P) and G projected densely (QR of the b x P block).

Step time: minimum (and median) over ``--repeats`` interleaved repetitions (methods alternate, so load
drift hits all; the minimum is the least disturbed by other processes on a shared machine).
Peak memory: each method runs in a fresh subprocess; after a warm-up step and ``zero_grad`` the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs`` = 5), then one step runs and the peak is
``VmHWM - VmRSS`` (bytes above the resting state: activations, gradients, transients). glibc is told to
serve every allocation >= 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from proma import ProjectedAccumulator

LINEAR_SHAPES = [(1024, 2048), (1024, 1024), (2048, 1024), (1024, 3072), (3072, 1024)]


# -- workloads -----------------------------------------------------------------------------------------
def small_qwen3(seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


def qwen_batches(b, T, M, vocab=512, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(M):
        ids = torch.randint(0, vocab, (b, T), generator=gen)
        lengths = torch.randint(T // 2, T + 1, (b,), generator=gen)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        out.append(((ids, mask), torch.randn(b, generator=gen)))
    return out


def qwen_seq_logp(model, batch):
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * (mask[:, 1:] * mask[:, :-1])).sum(dim=1)


def linear_model(i, o, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(i, o, bias=False))


def linear_batches(i, o, b, T, M, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [((torch.randn(b, T, i, generator=gen), torch.randn(b, T, o, generator=gen)), torch.randn(b, generator=gen))
            for _ in range(M)]


def linear_seq_logp(model, batch):
    x, r = batch
    return (model(x) * r).sum(dim=(1, 2))


# -- methods -------------------------------------------------------------------------------------------
METHOD_KWARGS = {
    "plain": dict(variant="none"),
    "proma/exact": dict(variant="proma", solver="exact"),
    "proma/exact/materialize": dict(variant="proma", solver="exact", strategy="materialize"),
    "proma/exact/ghost": dict(variant="proma", solver="exact", strategy="ghost"),
    "proma/gram_schmidt": dict(variant="proma", solver="gram_schmidt", passes=2, relative_bound=0.5),
    "proma/ridge": dict(variant="proma", solver="ridge"),
    "intra": dict(variant="intra", intra_rank=1),
}


def naive_step_fn(model, batches, forward):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        G = [torch.zeros(p.numel(), device=p.device) for p in params]
        for batch, w in batches:
            lp = forward(model, batch)
            b = lp.shape[0]
            rows = [torch.autograd.grad(lp[i], params, retain_graph=i < b - 1) for i in range(b)]
            for k in range(len(params)):
                g = torch.stack([rows[i][k].reshape(-1) for i in range(b)])  # (b, P_k)
                q, _ = torch.linalg.qr(g.T)                                   # orthonormal basis of the span
                G[k] -= q @ (q.T @ G[k])
                G[k] += w @ g
        for p, gk in zip(params, G):
            p.grad = gk.view_as(p)
    return step


def accumulator_step(model, batches, forward, acc_kwargs):
    """``(step, acc)``: one optimizer step's ``zero_grad`` + ``acc.backward`` of every microbatch."""
    acc = ProjectedAccumulator(model, **acc_kwargs)

    def step():
        acc.zero_grad()
        for batch, w in batches:
            acc.backward(forward(model, batch), w)
    return step, acc


def step_fn(method, model, batches, forward):
    if method == "naive":
        return naive_step_fn(model, batches, forward), None
    return accumulator_step(model, batches, forward, METHOD_KWARGS[method])


def _to(batches, device):
    return [(tuple(x.to(device) for x in batch), w.to(device)) for batch, w in batches]


def workload(case, args):
    dev = torch.device(args.device)
    if case == "qwen":
        return small_qwen3().to(dev), _to(qwen_batches(args.b, args.T, args.microbatches), dev), qwen_seq_logp
    i, o = map(int, case.split(":")[1].split("x"))
    return (linear_model(i, o).to(dev), _to(linear_batches(i, o, args.b, args.T, args.microbatches), dev),
            linear_seq_logp)


def _sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


# -- measurement ---------------------------------------------------------------------------------------
def time_methods(case, methods, args):
    model, batches, forward = workload(case, args)
    steps = {}
    for m in methods:
        steps[m] = step_fn(m, model, batches, forward)
    times = {m: [] for m in methods}
    for m in methods:
        steps[m][0]()  # warm-up
    for _ in range(args.repeats):
        for m in methods:
            _sync(args)
            t0 = time.perf_counter()
            steps[m][0]()
            _sync(args)
            times[m].append(time.perf_counter() - t0)
    strategies = {}
    for m, (_, acc) in steps.items():
        if acc is not None:
            if m.startswith("proma"):
                strategies[m] = sorted({d["strategy"] for d in acc.stats()["params"].values()})
            acc.close()
    return ({m: min(v) for m, v in times.items()}, {m: statistics.median(v) for m, v in times.items()},
            strategies)


def status_kib(field):
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _warmed_up(case, method, args):
    """Model, one-step closure and accumulator after a warm-up step, gradients cleared: the resting state."""
    model, batches, forward = workload(case, args)
    step, acc = step_fn(method, model, batches, forward)
    step()
    model.zero_grad(set_to_none=True)
    if acc is not None:
        acc.zero_grad()
    return model, step, acc


def measure_memory_child(case, method, args):
    torch.set_num_threads(args.threads)
    model, step, _ = _warmed_up(case, method, args)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS")
    step()
    peak = status_kib("VmHWM")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"extra_bytes": (peak - base) * 1024, "param_bytes": params}))


def measure_memory_cuda(case, method, args):
    """GPU: peak of torch.cuda.memory_allocated during one step, above the resting state."""
    model, step, acc = _warmed_up(case, method, args)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    if acc is not None:
        acc.close()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"extra_bytes": peak - base, "param_bytes": params}


def measure_memory(case, method, args):
    if args.device.startswith("cuda"):
        return measure_memory_cuda(case, method, args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child-memory", case, method, "--b", str(args.b), "--T", str(args.T),
           "--microbatches", str(args.microbatches), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- report --------------------------------------------------------------------------------------------
def table(case, methods, args, title):
    times, medians, strategies = time_methods(case, methods, args)
    mem = {m: measure_memory(case, m, args) for m in methods}
    plain_t, plain_m = times["plain"], mem["plain"]["extra_bytes"]
    lines = [f"### {title}", "",
             f"b = {args.b} sequences x T = {args.T} tokens per microbatch, {args.microbatches} microbatches per "
             f"step, float32, {args.device}, {args.threads} CPU thread(s); parameters {mem['plain']['param_bytes'] / 2**20:.1f} MiB.",
             "",
             "| method | step time (ms), min | x plain | median x plain | naive / method | "
             "peak memory above rest (MiB) | extra vs plain / plain peak | strategies |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    naive_t = times.get("naive")
    for m in methods:
        t, b_ = times[m], mem[m]["extra_bytes"]
        speed = f"{naive_t / t:.1f}" if naive_t else "-"
        extra = (b_ - plain_m) / plain_m if plain_m > 0 else float("nan")
        med = medians[m] / medians["plain"]
        lines.append(f"| {m} | {1e3 * t:.1f} | {t / plain_t:.2f} | {med:.2f} | {speed} | {b_ / 2**20:.1f} | "
                     f"{extra:+.2f} | {', '.join(strategies.get(m, [])) or '-'} |")
    lines.append("")
    return "\n".join(lines), times, mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU: memory from torch.cuda peak stats)")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child-memory", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_memory:
        measure_memory_child(*args.child_memory, args)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    qwen_methods = ["plain", "proma/exact", "proma/gram_schmidt", "proma/ridge", "intra", "naive"]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores visible"
    text = ["## ProjectedAccumulator benchmark (`benchmarks/bench_accumulator.py`)", "",
            f"torch {torch.__version__}, {where}; command: "
            f"`python benchmarks/bench_accumulator.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    out, _, _ = table("qwen", qwen_methods, args, "Small Qwen3 (hidden 256, 4 layers, vocab 512, tied)")
    print(out, flush=True)
    text.append(out)
    shapes = [] if args.skip_linear else LINEAR_SHAPES[:2] if args.quick else LINEAR_SHAPES
    lin_methods = ["plain", "proma/exact/materialize", "proma/exact/ghost", "proma/exact", "intra", "naive"]
    for i, o in shapes:
        out, _, _ = table(f"linear:{i}x{o}", lin_methods, args, f"Linear {i} -> {o} (Qwen3-0.6B shape)")
        print(out, flush=True)
        text.append(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(text))


if __name__ == "__main__":
    main()
