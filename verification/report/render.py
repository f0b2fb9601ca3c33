"""The text of REPORT.md, generated from the measured values: the section order and the sections of its own.

Every sentence that states a result is built from numbers passed in, with the direction of the comparison
decided by those numbers (no conclusion is written in advance). Tables are GitHub markdown. The sections live in
:mod:`verification.report.seed_text` (verdicts, seeds), :mod:`verification.report.projection_text` (sections 1-2) and
:mod:`verification.report.grid_text` (sections 3, 4, 8).
"""
from __future__ import annotations

import math

from . import study2_section
from .inputs import ReportInputs
from .grid_text import (_claims, _kl_intro, _kl_rollout, _learning, _local_kl, _proma_vs_grpo_section,
                        _second_order)
from .projection_text import (_approximations, _intra, _layerwise_global, _oracle, _study_intro,
                              _torch_vs_reference)
from .seed_text import resumed_seed_study, secondary_section, seed_headline, seed_tables, verdicts_section
from .markdown import f, pct, table


def _headline(meta, oracle, studies, seeds=None) -> list:
    lines = []
    res = oracle["results"]
    refreshed = meta.get("refreshed", {}).get("oracle")
    again = f" (rerun alone at `{refreshed}`, after the rest of this report)" if refreshed else ""
    for impl in ("torch", "torch-float32"):
        rows = res.get(impl, [])
        n_pass = sum(r["status"] == "PASS" for r in rows)
        worst = max((r["max_rel_err"] for r in rows if r.get("max_rel_err") is not None), default=math.nan)
        lines.append(f"- Oracle, `{impl}`: {n_pass}/{len(rows)} golden cases pass; worst relative error {f(worst)}{again}.")
    for snap, st in studies.items():
        proj64 = [r["max_rel_err"] for r in st["torch_vs_reference"] if r["dtype"] == "float64" and r["setting"] != "none"]
        proj32 = [r["max_rel_err"] for r in st["torch_vs_reference"] if r["dtype"] == "float32"]
        s = st["settings"]
        lines.append(
            f"- Real microbatches ({snap} policy, {st['n_microbatches']} microbatches, {st['n_parameters']:,} "
            f"parameters): torch vs reference worst relative error {f(max(proj64, default=math.nan))} (float64, "
            f"projecting settings), {f(max(proj32, default=math.nan))} (float32). Distance to the exact "
            f"layer-wise result: Gram-Schmidt 1/2/4 passes {f(s['gram_schmidt, 1 pass']['rel_dist_to_exact'])}/"
            f"{f(s['gram_schmidt, 2 passes']['rel_dist_to_exact'])}/{f(s['gram_schmidt, 4 passes']['rel_dist_to_exact'])}, "
            f"ridge 1e-2 {f(s['ridge 1e-2']['rel_dist_to_exact'])}, paper settings "
            f"{f(s['paper: gram_schmidt 2, bound 0.5']['rel_dist_to_exact'])}, global exact "
            f"{f(s['exact (global)']['rel_dist_to_exact'])}; plain accumulation {f(st['plain_vs_exact_rel_dist'])}.")
    total = sum(meta["timings_s"].values())
    lines.append(f"- Wall time of this report: {total / 60:.1f} min ("
                 + ", ".join(f"{k} {v / 60:.1f}" for k, v in meta["timings_s"].items()) + ")."
                 + resumed_seed_study(meta, seeds))
    return lines


def _configuration(meta) -> list:
    g, c = meta["grid"], meta["harness_config"]
    keys = ("task", "preset", "hidden_size", "num_layers", "vocab_size", "warmstart_steps", "prompts_per_step",
            "group_size", "minibatches", "microbatch_size", "max_new_tokens", "aggregation", "advantage",
            "clip_eps", "intra_rank", "intra_form", "eval_size", "eval_every", "dtype", "seed")
    return [
        f"Command: `{meta['command']}` (mode `{meta['mode']}`). Methods {', '.join(g['methods'])}, each at learning "
        f"rates {', '.join(f'{lr:g}' for lr in g['lrs'])}, {g['steps']} rollout steps ({g['steps'] * c['minibatches']} "
        f"optimizer steps), all from one cached supervised warm-start.",
        "",
        table(["option", "value"], [(k, c.get(k)) for k in keys]),
        "",
        f"Machine: {meta['machine']['platform']}, Python {meta['machine']['python']}.",
    ]


def _first_order(r: ReportInputs) -> list:
    from ..studies.first_order import markdown, reading

    lines = []
    if r.first_order:
        body = markdown(r.first_order["result"]).splitlines()[2:]  # without markdown()'s own heading
        body += [""] + reading(r.first_order["result"])
        lines += [f"Exact PROMA guarantees g_i · G_M = g_i · pg_M for the last microbatch's sequences i, so a plain "
                  f"SGD step θ − lr G_M changes their log-probabilities by −lr g_i · pg_M + O(lr²). Measured on "
                  f"{r.first_order['where']} (float64):", ""] + body + [""]
    else:
        lines += ["The first-order check did not run.", ""]
    rows = [(b["method"], f"{b['lr']:g}", b["steps"], pct(b.get("exceeded_frac")), f(b.get("ratio_median")),
             f(b.get("ratio_max"))) for b in r.kl_bounds]
    if rows:
        lines += ["Second-order estimate as a bound on the local KL of the single-seed grid's optimizer steps "
                  "(exact = `local_kl_seq`, estimate = 0.5 mean_i (g_i · dθ)²; steps: those with a positive "
                  "estimate):", "",
                  table(["method", "lr", "steps", "exact > estimate", "median exact / estimate",
                         "max exact / estimate"], rows), ""]
    return lines


def _raw_data(r: ReportInputs) -> list:
    return (["Files in this directory (training runs and checkpoints are in the runs directory, not committed):", ""]
            + [f"- `{p}`" for p in r.data_files] + [""])


SECTIONS = (
    ("## Verdicts on the paper's claims (pre-registered)", verdicts_section),
    ("## The second study: proximality or a smaller step (pre-registered)",
     lambda r: study2_section.section((r.seeds or {}).get("study2"))),
    ("## Headline numbers", lambda r: _headline(r.meta, r.oracle, r.studies, r.seeds) + seed_headline(r) + [""]),
    ("## Configuration", lambda r: _configuration(r.meta) + [""]),
    ("## 1. Oracle: implementations against the golden cases", lambda r: _oracle(r.oracle) + [""]),
    ("## 2. Projection error on real GSM8K microbatches", _study_intro),
    ("### 2.1 torch vs reference", lambda r: _torch_vs_reference(r.studies) + [""]),
    ("### 2.2 Published approximations vs exact projection", lambda r: _approximations(r.studies)),
    ("### 2.3 Layer-wise vs global exact projection", lambda r: _layerwise_global(r.studies) + [""]),
    ("### 2.4 Intra-microbatch variant", lambda r: _intra(r.studies)),
    ("## 3. KL control", _kl_intro),
    ("### 3.1 Local KL per optimizer step", _local_kl),
    ("### 3.2 Exact KL vs second-order estimate", _second_order),
    ("### 3.3 KL to the rollout policy", _kl_rollout),
    ("### 3.4 PROMA vs GRPO", _proma_vs_grpo_section),
    ("## 4. Entropy and learning", _learning),
    ("## 5. Seeds and regimes", seed_tables),
    ("## 6. Secondary analyses (pre-registered, decide nothing)", secondary_section),
    ("## 7. First-order check of the mechanism", _first_order),
    ("## 8. Reading of the single-seed grid against the paper's claims",
     lambda r: _claims(r.meta, r.studies, r.summaries) + [""]),
    ("## 9. Raw data", _raw_data),
)


SECTION_HEADINGS = tuple(heading for heading, _ in SECTIONS)


def render(*, meta, oracle, studies, summaries, figures, data_files, seeds=None, first_order=None,
           kl_bounds=()) -> str:
    """The text of REPORT.md: a title, then every section of :data:`SECTIONS` in order."""
    inputs = ReportInputs(meta, oracle, studies, summaries, figures, data_files, seeds, first_order,
                          list(kl_bounds))
    out = ["# PROMA verification report", "",
           "Generated by `proma-verify report` from measured values; every number below comes from this run "
           "(raw JSON in `data/`).", ""]
    for heading, renderer in SECTIONS:
        out += [heading, ""] + renderer(inputs)
    return "\n".join(out)
