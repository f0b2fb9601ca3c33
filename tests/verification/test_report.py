"""The report generator: end to end on the smoke configuration, and text that follows the numbers."""
import json
import re

import numpy as np

import pytest

from verification.report import grid_text, render, seed_text
from verification.report.inputs import ReportInputs
from verification.report.render import SECTION_HEADINGS
from verification.report.generate import generate_report, refresh_oracle, rerender_report


@pytest.mark.slow
def test_smoke_report_end_to_end(tmp_path, realcase_cache):
    out = tmp_path / "report"
    path = generate_report(out, mode="smoke", realcase_cache=realcase_cache, log=lambda *a, **k: None)
    text = path.read_text()
    positions = [text.find(h + "\n") for h in SECTION_HEADINGS]
    assert all(p >= 0 for p in positions), [h for h, p in zip(SECTION_HEADINGS, positions) if p < 0]
    assert positions == sorted(positions)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(images) >= 9
    for name in images:
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("oracle.json", "summaries.json", "meta.json", "projection_end.json", "first_order.json"):
        json.loads((out / "data" / name).read_text())
    seeds = sorted(p.name for p in (out / "data" / "seeds" / "smoke").glob("*.json"))
    assert seeds[:4] == ["grpo-lr0.001-s0.json", "grpo-lr0.001-s1.json", "proma-lr0.001-s0.json",
                         "proma-lr0.001-s1.json"] and seeds[5] == "warmstart.json"
    assert re.fullmatch(r"start_eval-[0-9a-f]{16}\.json", seeds[4])     # named by the warm-start's weights
    assert json.loads((out / "data" / "seeds" / "smoke" / "warmstart.json").read_text())["seconds"] > 0
    # no verdict outside the full study: neither a claim nor a regime condition is judged
    assert "smoke mode: no verdict" in text and "**supported**" not in text and "**met**" not in text
    assert "| exact | 2.0" in text or "| exact | 1.9" in text  # first-order slope of exact PROMA
    runs = sorted(p.name for p in (out / "data" / "runs").glob("*.json"))
    assert len(runs) == 10  # 5 methods x 2 learning rates
    oracle = json.loads((out / "data" / "oracle.json").read_text())
    assert all(r["status"] == "PASS" for rows in oracle["results"].values() for r in rows)
    assert "nan" not in text.lower().replace("nans", "")
    assert (out / "runs" / ".gitignore").read_text().strip().endswith("*")
    # --render-only rebuilds the same text from data/ alone
    (out / "REPORT.md").unlink()
    assert rerender_report(out, log=lambda *a, **k: None).read_text() == text
    # --refresh-oracle reruns that phase alone, records its commit and changes only the oracle lines
    (out / "data" / "oracle.json").write_text(json.dumps({**oracle, "results": {}, "n_cases": 0}))
    refreshed = refresh_oracle(out, realcase_cache=realcase_cache, log=lambda *a, **k: None).read_text()
    commit = json.loads((out / "data" / "meta.json").read_text())["refreshed"]["oracle"]
    assert json.loads((out / "data" / "oracle.json").read_text())["n_cases"] == oracle["n_cases"]
    changed = [b for a, b in zip(text.splitlines(), refreshed.splitlines()) if a != b]
    assert len(changed) == 2 and all(f"(rerun alone at `{commit}`, after the rest of this report)" in line
                                     for line in changed)


def _summary(method, lr, kl, gain=0.1, val=0.5, entropy=(1.0, 0.9)):
    stats = {"mean": kl, "p95": 2 * kl, "max": 3 * kl, "n": 4}
    nan = float("nan")
    return {"method": method, "lr": lr, "local_kl": stats, "local_kl_seq": stats, "local_kl_2nd_order": stats,
            "kl_rollout": stats, "removed_ratio": stats, "grad_norm": stats, "clip_ratio": stats,
            "second_order": {"median_ratio": 1.0, "ratio_p5": 0.5, "ratio_p95": 2.0, "log_corr": 0.9, "n": 4},
            "reward_start": 0.1, "reward_end": 0.1 + gain, "reward_gain": gain, "entropy_start": entropy[0],
            "entropy_end": entropy[1], "entropy_ratio": entropy[1] / entropy[0], "entropy_min": entropy[1],
            "val_start": 0.1, "val_end": val, "val_max": val, "val_gain": val - 0.1, "step_time": nan,
            "wall_time": nan, "steps": 4, "opt_steps": 8}


META = {"grid": {"steps": 4, "methods": [], "lrs": []}, "timings_s": {},
        "harness_config": {"eval_size": 256, "microbatch_size": 16, "minibatches": 2, "prompts_per_step": 16,
                           "group_size": 8, "max_new_tokens": 10}}


@pytest.mark.parametrize("proma_kl", [0.5, 2.0])
def test_single_seed_reading_quotes_the_kl_numbers_without_a_verdict(proma_kl):
    summaries = [_summary("grpo", 1e-4, 1.0), _summary("proma", 1e-4, proma_kl)]
    text = "\n".join(grid_text._claims(META, {}, summaries))
    assert f"{proma_kl:g}x at lr 0.0001" in text
    assert "agree with the claim" not in text and "do not reproduce" not in text and "verdict table" in text


def test_reading_entropy_and_validation_verdicts():
    summaries = [_summary("grpo", 1e-4, 1.0, entropy=(1.0, 0.2), val=0.3),
                 _summary("proma", 1e-4, 1.0, entropy=(1.0, 0.9), val=0.4),
                 _summary("intra", 1e-4, 1.0, entropy=(1.0, 0.8), val=0.6)]
    text = "\n".join(grid_text._claims(META, {}, summaries))
    assert "fell below half its start: grpo" in text and "proma" not in text.split("half its start: ")[1][:20]
    assert "at lr 0.0001, intra 0.6 ranks 1 of 3 (highest: intra 0.6;" in text
    assert "intra is best" not in text


def test_equal_gain_interpolation():
    from verification.studies.equal_gain import kl_at_equal_gain

    eq = kl_at_equal_gain([(0.1, 1e-3), (0.3, 4e-3)], [(0.2, 1e-2), (0.4, 2e-2)])
    assert eq["gain"] == pytest.approx(0.25)
    assert eq["kl_a"] == pytest.approx(1e-3 * 4 ** 0.75)
    assert eq["kl_b"] == pytest.approx(1e-2 * 2 ** 0.25)
    assert kl_at_equal_gain([(0.1, 1e-3)], [(0.5, 1e-3), (0.6, 1e-3)]) is None


def test_seed_sections_render_intervals_and_verdicts():
    """Sections 5-7 from synthetic seed-study results: interval tables, the verdict table, the KL bound rows."""
    from verification.studies import tables
    from verification.report.seed_evidence import SEED_GRIDS

    grid = SEED_GRIDS["smoke"]
    runs = {(m, 1e-3, s): {"reward_gain": 0.1 + 0.01 * s, "local_kl_mean": kl * (1 + 0.1 * s),
                           "local_kl_cum": 2 * kl * (1 + 0.1 * s), "entropy_start": 1.0, "entropy_min_ratio": 0.9,
                           "entropy_end_ratio": 0.95, "val_final": 0.5, "val_final_se": 0.1, "val_change": 0.01}
            for m, kl in (("grpo", 0.02), ("proma", 0.01)) for s in (0, 1)}
    seeds = {"grid": grid, "results": {"smoke": runs}, "tables": {"smoke": tables.aggregate(runs)},
             "start": {"smoke": [{"file": "start_eval-abc.json", "n": 16, "accuracy": 0.5, "se": 0.125,
                                  "seeds": [0, 1]}]}, "run_seconds": 600.0}
    meta = {**META, "mode": "smoke"}
    inputs = ReportInputs(meta, {}, {}, [], {}, [], seeds, None,
                                  [{"method": "grpo", "lr": 1e-3, "steps": 4, "exceeded_frac": 0.25,
                                    "ratio_median": 0.6, "ratio_max": 2.5}, {"method": "proma", "lr": 1e-3, "steps": 0}])
    text = "\n".join(seed_text.seed_tables(inputs) + seed_text.verdicts_section(inputs)
                     + render._first_order(inputs))
    assert "| proma | 0.001 | 0.500 [0.500, 0.500]" in text  # every seed's local-KL ratio to grpo is 0.5
    assert "first 16 items" in text and "warm-start validation 0.5 ± 0.125 on 16 items" in text
    assert "(`start_eval-abc.json`, seeds 0-1)" in text
    assert "| grpo | 0.001 | 0.500 ± 0.100 | 0.500 ± 0.100 |" in text  # validation per seed, with its SE
    assert "took 10.0 minutes of one single-threaded worker" in text and "about 5 minutes of wall time" in text
    assert "smoke mode: no verdict" in text and "**supported**" not in text
    assert "| grpo | 0.001 | 4 | 25.0% | 0.6 | 2.5 |" in text and "| proma | 0.001 | 0 | - | - | - |" in text
    assert "first-order check did not run" in text


def test_full_mode_verdict_table_comes_first_and_decides():
    """Full mode, 15 paired seeds: the first section's table decides with Holm p and states entropy both ways."""
    from verification.studies import claims
    from verification.report.seed_evidence import SEED_GRIDS

    rng = np.random.default_rng(0)
    cols = {"reinforce": (1.3, 0.3, 0.6), "grpo": (1.0, 0.3, 0.6), "proma": (0.5, 0.4, 0.6),
            "proma-paper": (1.0, 0.3, 0.6), "intra": (0.5, 0.4, 0.7)}
    results = {regime: {(m, lr, s): {"local_kl_mean": kl * (1 + 0.02 * rng.standard_normal()),
                                     "entropy_end_ratio": ent + 0.01 * rng.standard_normal(),
                                     "val_final": v + 0.002 * rng.standard_normal(), "reward_gain": 0.05,
                                     "val_change": 0.0}
                        for m, (kl, ent, v) in cols.items() for s in range(15)}
               for regime, lr in (("learn-240", 1e-4), ("collapse", 3e-4), ("heldout-all-lr5e-5", 5e-5))}
    seeds = {"grid": SEED_GRIDS["full"], "results": results, "tables": {}, "start": {},
             "regime_checks": claims.regime_checks(results, mode="full")}
    text = "\n".join(seed_text.verdicts_section(ReportInputs({**META, "mode": "full"}, {}, {}, [], {}, [],
                                                                          seeds)))
    assert "| KL-G-L | exact PROMA keeps the local KL tighter than GRPO | learn-240 | 15 | ratio 0.49" in text
    # KL-P-* and EN-P-* have no effect; the other seven are clear
    assert text.count("**supported**") == 7 and "In progress" not in text and "**contradicted**" not in text
    assert "EN-G-C (collapse): proma on average keeps more entropy than GRPO" in text
    assert "GRPO collapses (0.29" in text and "proma collapses (0.39" in text
    assert "| GRPO collapses entropy |" in text and "PREREGISTRATION.md" in text
    assert "KL-P-L: at the observed effect" in text


def test_headline_quotes_seed_study_intervals_and_regime_conditions():
    """The headline's seed-study line: every method's paired KL ratio, validation and gain with intervals."""
    from verification.studies import claims, tables
    from verification.report.seed_evidence import SEED_GRIDS

    jitter = (-0.02, 0.01, 0.0, 0.015, -0.005)
    runs = {(m, 1e-4, s): {"reward_gain": 0.05 * (1 + j), "local_kl_mean": kl * (1 + j), "local_kl_cum": 1.0,
                           "entropy_start": 1.0, "entropy_min_ratio": 0.5, "entropy_end_ratio": 0.8,
                           "val_final": 0.3 + j, "val_final_se": 0.007, "val_change": 0.01 + j}
            for m, kl in (("grpo", 0.02), ("proma", 0.01)) for s, j in enumerate(jitter)}
    seeds = {"grid": SEED_GRIDS["full"], "results": {"learn": runs}, "tables": {"learn": tables.aggregate(runs)},
             "start": {}, "regime_checks": claims.regime_checks({"learn": runs}, mode="full")}
    inputs = ReportInputs({**META, "mode": "full"}, {}, {}, [], {}, [], seeds)
    head = seed_text.seed_headline(inputs)
    assert len(head) == 1 and "regime `learn`, lr 0.0001 (5 seeds; 95% t-intervals; section 5)" in head[0]
    assert "proma 0.500 [0.500, 0.500]" in head[0]       # every seed's KL ratio is 0.5
    assert "reward gain: grpo +0.050 [" in head[0]
    conditions = "\n".join(seed_text.verdicts_section(inputs))
    assert "| GRPO learns (reward on the training pool rises" in conditions
    assert "| learn, lr 0.0001 | reward gain 0.050 [" in conditions
    assert "validation change +0.010 [" in conditions and "**not met**" in conditions
    quick = ReportInputs({**META, "mode": "quick"}, {}, {}, [], {}, [], seeds)
    assert "quick mode: the code path, not evidence" in seed_text.seed_headline(quick)[0]
    # a study in progress: proma has 3 of grpo's 5 seeds, and the headline says so
    partial = {k: v for k, v in runs.items() if k[0] == "grpo" or k[2] < 3}
    busy = ReportInputs({**META, "mode": "full"}, {}, {}, [], {}, [],
                                {**seeds, "tables": {"learn": tables.aggregate(partial)}})
    assert "lr 0.0001 (3-5 seeds; 95% t-intervals; section 5)" in seed_text.seed_headline(busy)[0]


def test_render_only_names_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"data/meta\.json: missing"):
        rerender_report(tmp_path, log=lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"data/meta\.json: missing; --refresh-oracle"):
        refresh_oracle(tmp_path, log=lambda *a, **k: None)


def test_resumed_seed_study_states_the_cost_from_scratch():
    """A resumed study's headline adds its runs (per worker) and the regimes' own warm-starts, not the shared one."""
    meta = {"timings_s": {"training": 600.0, "seed_study": 6.0}, "harness_config": {"warmstart_steps": 3000}}
    seeds = {"run_seconds": 7200.0, "warmstarts": {"learn-240": {"steps": 1000, "seconds": 720.0},
                                                   "collapse": {"steps": 3000, "seconds": 900.0}}}
    text = seed_text.resumed_seed_study(meta, seeds)
    # 600 s of this report + 7200 / 2 workers + 720 s of learn-240's own warm-start = 4920 s = 82 min
    assert "120 worker-minutes, about 60 min on 2 workers, plus 12 min to train the 1000-step warm-start of " \
           "`learn-240`, so the whole report takes about 82 min (1.4 h)." in text
    assert "collapse" not in text
    # regimes sharing one warm-start (same key) pay for its training once, at its shortest recorded time
    shared = {**seeds, "warmstarts": {**seeds["warmstarts"],
                                      "learn-240": {"key": "k1", "steps": 1000, "seconds": 720.0},
                                      "heldout": {"key": "k1", "steps": 1000, "seconds": 3000.0}}}
    assert "plus 12 min to train the 1000-step warm-start of `heldout`, `learn-240`, so the whole report takes " \
           "about 82 min" in seed_text.resumed_seed_study(meta, shared)
    # a study in progress: the cost covers the runs done, and the plan estimates the rest
    from verification.studies.plan import PlanRow
    from verification.studies.seeds import StudyGrid
    grid = StudyGrid(regimes={"a": {}}, lrs={"a": (1e-3,)}, methods=("grpo", "proma"), seeds=(0, 1))
    busy = {**seeds, "grid": grid, "results": {"a": {("grpo", 1e-3, 0): {}, ("proma", 1e-3, 0): {}}},
            "plan": [PlanRow("a", "grpo", 2, 1, 60.0, True), PlanRow("a", "proma", 2, 1, 120.0, True)]}
    text = seed_text.resumed_seed_study(meta, busy)
    assert "run from scratch the 2 of 4 planned runs done so far take 120 worker-minutes" in text
    assert text.endswith("The other 2 planned runs are estimated at 3.0 more worker-hours from the done runs' "
                         "times (`python -m verification.studies.seeds --plan`).")
    # a study that ran in this report (its seed_study phase took the runs' time) needs no estimate
    assert seed_text.resumed_seed_study({**meta, "timings_s": {"seed_study": 3600.0}}, seeds) == ""


def test_intra_float32_deviation_names_the_token_row_rule_the_study_ran_with():
    from verification.report.projection_text import _intra32_deviation

    row = {"max_rel_err": 1.33e-3, "worst": "mb1 model.layers.0.self_attn.q_proj.weight"}
    old = _intra32_deviation(row, None)     # a study before the rule recorded itself: every non-zero row
    assert old.startswith("Intra in float32 deviates by 0.00133 (mb1 model.layers.0.self_attn.q_proj.weight). ")
    assert "non-zero (the rule when this study ran" in old and "112 vs 113" in old
    new = _intra32_deviation(row, 4)
    assert "largest |D| entry exceeds 4 eps32 of D's largest" in new and "non-zero" not in new
    assert "112 vs 113" not in new      # the earlier trace concerned the old rule
    assert "are not traced" in new and "report grid, start policy" not in new
    start = _intra32_deviation(row, 4, traced=True)   # the start policy is a case of intra_rows.md
    assert "`intra_rows.md` measures this policy's rows (its case \"report grid, start policy\")" in start
    assert "not traced" not in start


def test_the_float32_intra_paragraph_points_at_intra_rows_only_for_the_traced_start_policy():
    from verification.report.projection_text import _torch_vs_reference

    rows = [{"setting": "intra (two_sided, rank 1)", "dtype": "float32", "max_rel_err": 0.0888,
             "worst": "mb2 model.layers.1.self_attn.q_proj.weight"}]

    def study(snapshot, policy):
        return {snapshot: {"snapshot": snapshot, "policy": policy, "rollout_step": 0, "sequences": [16],
                           "nonzero_weights": [4], "torch_vs_reference": rows, "intra_row_cut_eps32": 4}}

    start = "\n".join(_torch_vs_reference(study("start", "warm-start")))
    assert "`intra_rows.md` measures this policy's rows" in start and "not traced" not in start
    for snapshot, policy in (("end", "proma lr=0.0001 after 80 steps"), ("start", "FALLBACK: the real-case policy")):
        text = "\n".join(_torch_vs_reference(study(snapshot, policy)))
        assert "This policy's rows are not traced" in text and "measures this policy's rows" not in text
