"""verification.report.seed_figures: the first study's forest plot and seed-averaged curves (synthetic runs)."""
import json

import numpy as np

from verification.report import seed_figures as F
from verification.studies import tables
from verification.tolerances import FLOAT64_RTOL


def _result(method, seed, n_steps=30, kl=1e-3):
    recs = []
    for step in range(n_steps):
        for mb in (0, 1):
            recs.append({"step": step, "minibatch": mb, "entropy": 2.0 - 0.01 * step + 0.001 * seed,
                         "reward": 0.3 + 0.001 * step, "local_kl": kl * (1 + 0.1 * mb)})
    return {"config": {"method": method, "lr": 1e-4, "seed": seed}, "metrics": recs}


def test_smooth_is_a_trailing_mean_with_the_first_value_before_the_start():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(F._smooth(x, 3), [1.0, 4 / 3, 2.0, 3.0, 4.0], rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(F._smooth(x, 1), x, rtol=FLOAT64_RTOL)


def test_run_curves_take_rollout_numbers_once_per_step_and_the_kl_per_optimizer_step():
    c = F.run_curves(_result("grpo", 0, n_steps=30))
    assert c["entropy"].size == 30 and c["reward"].size == 30 and c["local_kl"].size == 60
    k = max(1, round(F.ROLLOUT_SMOOTH * 30))
    raw = (2.0 - 0.01 * np.arange(30)) / 2.0
    np.testing.assert_allclose(c["entropy"], F._smooth(raw, k), rtol=FLOAT64_RTOL)
    np.testing.assert_allclose(c["local_kl"][0], np.log(1e-3), rtol=FLOAT64_RTOL)
    # the second optimizer step: KL_SMOOTH - 1 copies of the first value (it stands in before the start) and the second
    k_kl = F.KL_SMOOTH
    want = ((k_kl - 1) * np.log(1e-3) + np.log(1.1e-3)) / k_kl
    np.testing.assert_allclose(c["local_kl"][1], want, rtol=FLOAT64_RTOL)


def test_figures_are_drawn_from_every_seed_of_the_data_folder(tmp_path):
    for m in ("grpo", "proma"):
        for s in range(3):
            path = tables.result_path(tmp_path / "seeds", "learn-240", m, 1e-4, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_result(m, s, kl=1e-3 if m == "grpo" else 5e-4)))
    curves = F.load_curves(tmp_path / "seeds")
    assert sorted(curves["learn-240"]) == ["grpo", "proma"] and len(curves["learn-240"]["proma"]) == 3
    png = F.curves_plot(curves, tmp_path / "c.png")
    assert png.is_file() and png.stat().st_size > 0
    # not the full study (no data folder): no figure, nothing written
    assert F.figures({"data_dir": None, "results": {}}, tmp_path) == {}


def test_the_second_studys_curves_read_the_out_of_sample_kl_of_one_learning_rate(tmp_path):
    from verification.report import study2_section as R

    for lr, oos in ((1e-4, 2e-4), (2e-4, 9e-4)):  # 1x and 2x of learn-240; only 1x is drawn
        for s in range(2):
            res = _result("grpo", s)
            res["config"]["lr"] = lr
            for r in res["metrics"]:
                r["oos_local_kl"] = oos
            path = tables.result_path(tmp_path, "learn-240", "grpo", lr, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res))
    curves = F.load_curves(tmp_path, ("learn-240",), kl_key="oos_local_kl", lrs={"learn-240": 1e-4})
    runs = curves["learn-240"]["grpo"]
    assert len(runs) == 2 and "local_kl" not in runs[0]
    np.testing.assert_allclose(runs[0]["oos_local_kl"], np.log(2e-4), rtol=FLOAT64_RTOL)
    assert len(F.load_curves(tmp_path, ("learn-240",), kl_key="oos_local_kl")["learn-240"]["grpo"]) == 4
    png = R.curves_1x_plot(tmp_path, tmp_path / "c1x.png")
    assert png.is_file() and png.stat().st_size > 0


def test_the_forest_plot_draws_every_decided_hypothesis(tmp_path):
    from verification.studies import preregistered as P

    rng = np.random.default_rng(0)
    results = {}
    for regime in ("learn-240", "collapse", P.DEFAULT_VALIDATION_REGIME):
        results[regime] = {(m, 1e-4, s): {"local_kl_mean": float(np.exp(rng.normal(-7, 0.1))),
                                          "entropy_end_ratio": 0.6 + 0.01 * rng.standard_normal(),
                                          "val_final": 0.3 + 0.01 * rng.standard_normal()}
                           for m in F.METHODS for s in range(15)}
    outcomes = P.decide(results)
    assert sum(o.estimate is not None for o in outcomes) == 11
    png = F.forest_plot(outcomes, tmp_path / "f.png")
    assert png.is_file() and png.stat().st_size > 0
