"""`esmm benchmark paper` and `esmm benchmark bias-sweep` end to end on tiny simulated sets."""

import csv
import json
import re
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from esmm import benchmark
from esmm.cli import app
from esmm.data.simulate import get_preset, write_simulation
from esmm.errors import UsageError
from tests.conftest import cli_output

runner = CliRunner()

TINY_WORLD = {"n_users": 300, "n_items": 3000, "n_shops": 500, "n_brands": 300,
              "n_intentions": 200, "n_categories": 50, "ctr": 0.1}
FEATURES = ('features=[{name: "101", kind: categorical, buckets: 500}, '
            '{name: "205", kind: categorical, buckets: 3000}, '
            '{name: "301", kind: categorical, buckets: 10}]')
FAST = ["--set", FEATURES, "--set", "model.tower=[8]", "--set", "model.embedding_dim=4",
        "--set", "train.batch_size=500", "--set", "train.max_steps=3",
        "--set", "train.eval_every=3"]


_out = cli_output


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "sim"
    write_simulation(d, get_preset("dense", **TINY_WORLD, cvr=0.2),
                     {"train": 2000, "valid": 1000, "test": 1000}, 5)
    return d


def test_paper_end_to_end_and_reuse(sim_dir, tmp_path, monkeypatch):
    out = tmp_path / "report"
    args = ["benchmark", "paper", "--data", str(sim_dir), "--seeds", "2", "--out", str(out),
            "--budget", "base=2", "--budget", "ctr_net=1", *FAST]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    for name in ("results.csv", "report.md", "auc.png"):
        assert (out / name).is_file(), name
    assert (out / "auc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    all_rows = _rows(out / "results.csv")
    assert len(all_rows) == 7 * 2 + 2
    ref = {r["seed"]: r for r in all_rows if r["method"] == benchmark.CTR_NET}
    assert set(ref) == {"0", "1"}
    assert all(r["monitor"] == "ctr_auc" and r["epochs"] == "1" for r in ref.values())
    rows = [r for r in all_rows if r["method"] != benchmark.CTR_NET]
    assert {(r["method"], r["seed"]) for r in rows} == {
        (m, s) for m in benchmark.PAPER_METHODS for s in ("0", "1")}
    for r in rows:
        for k in ("ctr_auc", "cvr_auc", "ctcvr_auc", "cvr_auc_entire_space"):
            assert 0.0 <= float(r[k]) <= 1.0
        assert r["monitor"] == benchmark.MONITOR[r["method"]]
        # CVR-net methods take pCTR from the seed's reference CTR net; the others their own.
        if r["method"] in benchmark.CTR_FROM_REFERENCE:
            assert r["ctr_auc"] == ref[r["seed"]]["ctr_auc"] and r["own_ctcvr_auc"]
        else:
            assert not r.get("own_ctcvr_auc")
    assert not any((out / "runs").glob("*/checkpoints"))  # deleted once measured
    epochs = {r["method"]: int(r["epochs"]) for r in rows}
    assert epochs["base"] == 2 and epochs["esmm"] == 4  # the demo config: 4 epochs
    assert epochs["oversampling"] == 4 * benchmark.CLICKED_ONLY_EPOCH_FACTOR
    report = (out / "report.md").read_text()
    assert "| ESMM | " in report and "68.56 ± 0.37" in report  # beside the paper's numbers
    assert "ESMM - BASE" in report and "CVR AUC, entire space" in report
    assert report in res.output

    # A second call reuses every finished run: nothing is trained.
    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(benchmark, "train", no_training)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    assert _rows(out / "results.csv") == all_rows


def test_bias_sweep_writes_tables_and_charts(tmp_path):
    out = tmp_path / "sweep"
    knobs = [x for k, v in TINY_WORLD.items() for x in ("--sim-set", f"{k}={v}")]
    res = runner.invoke(app, ["benchmark", "bias-sweep", "--out", str(out), "--selection",
                              "0,1", "--cvr", "0.2,0.1", "--seeds", "1", "--rows", "2000",
                              "--methods", "base,division,esmm", "--keep-checkpoints",
                              *knobs, *FAST])
    assert res.exit_code == 0, _out(res)
    rows = _rows(out / "sweep.csv")
    assert len(rows) == 2 * 2 * (3 + 1)  # three methods and the reference CTR net per cell
    assert (out / "runs" / "cvr0.1-sel0" / "esmm-seed0" / "checkpoints" / "best.pt").is_file()
    assert {(float(r["cvr"]), float(r["selection"])) for r in rows} == {
        (0.2, 0.0), (0.2, 1.0), (0.1, 0.0), (0.1, 1.0)}
    summary = _rows(out / "summary.csv")
    assert len(summary) == 4 * 3 and "esmm" in {r["method"] for r in summary}
    assert "cvr_auc_entire_space_minus_base_mean" in summary[0]
    for k in ("cvr_auc_entire_space", "cvr_auc", "ctcvr_auc"):
        assert (out / f"{k}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| 0.1 | 1 |" in report and "ESMM - BASE" in report
    meta = json.loads((out / "data" / "cvr0.1-sel1" / "simulation.json").read_text())
    assert meta["config"]["selection"] == 1.0 and meta["config"]["cvr"] == 0.1


@pytest.mark.parametrize("args,needle", [
    (["paper", "--methods", "base,nope"], "unknown method"),
    (["paper", "--budget", "base"], "METHOD=EPOCHS"),
    (["paper", "--budget", "base=0"], "positive integer"),
    (["bias-sweep", "--selection", "0,x"], "comma-separated numbers"),
    (["bias-sweep", "--sim-set", "cvr=0.1"], "--cvr"),
    (["bias-sweep", "--cvr", "2"], "cvr"),
])
def test_bad_usage_exits_2(tmp_path, args, needle):
    res = runner.invoke(app, ["benchmark", *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, _out(res)
    assert needle in _out(res)


def test_data_folder_is_checked(tmp_path, sim_dir):
    (tmp_path / "d" / "train").mkdir(parents=True)
    res = runner.invoke(app, ["benchmark", "paper", "--data", str(tmp_path / "d"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "valid" in _out(res)
    res = runner.invoke(app, ["benchmark", "paper", "--data", str(sim_dir), "--rows", "5000",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--data" in _out(res)


def test_help():
    for cmd in (["benchmark"], ["benchmark", "paper"], ["benchmark", "bias-sweep"],
                ["benchmark", "zoo"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0 and "--" in res.output


def test_statistics_helpers():
    rows = [{"method": "base", "seed": s, "a": v} for s, v in enumerate([0.6, 0.7, 0.8])]
    rows += [{"method": "esmm", "seed": s, "a": v} for s, v in enumerate([0.65, 0.72, 0.9])]
    d = benchmark.paired_diff(rows, "esmm", "a")
    assert d.tolist() == pytest.approx([0.05, 0.02, 0.1])
    m, s = benchmark.mean_std(d)
    assert m == pytest.approx(0.17 / 3) and s == pytest.approx(d.std(ddof=1))
    assert benchmark.epoch_budget("base", 4, {}) == 4 * benchmark.CLICKED_ONLY_EPOCH_FACTOR
    assert benchmark.epoch_budget("esmm", 4, {}) == 4
    assert benchmark.epoch_budget("esmm", 4, {"esmm": 9}) == 9
    with pytest.raises(UsageError):
        benchmark.parse_methods("", benchmark.PAPER_METHODS)


def test_zoo_end_to_end_seesaw_table_chart_and_reuse(sim_dir, tmp_path, monkeypatch):
    out = tmp_path / "zoo"
    methods = ["base", "mmoe", "esmm_mmoe", "aitm", "esmm"]
    args = ["benchmark", "zoo", "--data", str(sim_dir), "--seeds", "2", "--out", str(out),
            "--methods", ",".join(methods), "--set", "train.epochs=1", *FAST]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    all_rows = _rows(out / "results.csv")
    rows = [r for r in all_rows if r["method"] != benchmark.CTR_NET]
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in methods
                                                       for s in ("0", "1")}
    # One protocol for all: same cap, same early-stopping metric.
    assert {r["monitor"] for r in rows} == {benchmark.ZOO_MONITOR}
    assert {r["epochs"] for r in rows} == {"1"}
    assert (out / "seesaw.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| MMoE - BASE |" in report and "| ESMM-MMoE |" in report and "| AITM |" in report
    assert "moved both" in report and "`ctr_auc`" in report and "`cvr_auc`" in report
    # The reference row takes its CTR AUC from the seed's single-task CTR net.
    ref = {r["seed"]: r["ctr_auc"] for r in all_rows if r["method"] == benchmark.CTR_NET}
    assert all(r["ctr_auc"] == ref[r["seed"]] for r in rows if r["method"] == "base")

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(benchmark, "train", no_training)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    assert _rows(out / "results.csv") == all_rows


def test_seesaw_verdict_reads_the_paired_differences():
    def rows(ctr, cvr):
        out = [{"method": "base", "seed": s, "ctr_auc": 0.6, "cvr_auc": 0.6} for s in range(4)]
        out += [{"method": "m", "seed": s, "ctr_auc": 0.6 + c, "cvr_auc": 0.6 + v}
                for s, (c, v) in enumerate(zip(ctr, cvr, strict=True))]
        return out

    up, down, flat = [0.02, 0.03, 0.025, 0.02], [-0.02, -0.03, -0.025, -0.02], [
        0.01, -0.01, 0.005, -0.005]
    assert benchmark.seesaw_verdict(rows(up, up), "m") == "both up"
    assert benchmark.seesaw_verdict(rows(up, down), "m") == "seesaw: CTR up, CVR down"
    assert benchmark.seesaw_verdict(rows(down, up), "m") == "seesaw: CVR up, CTR down"
    assert benchmark.seesaw_verdict(rows(flat, flat), "m") == "neither moved"
    assert benchmark.seesaw_verdict(rows(up, flat), "m") == "one up, the other level"
    assert benchmark.seesaw_verdict(rows(up[:1], up[:1]), "m") == "too few seeds"
    nan = [float("nan")] * 4
    assert benchmark.seesaw_verdict(rows(up, nan), "m") == "`cvr_auc` not measured"


def test_paper_takes_zoo_models_beside_the_paper_methods(sim_dir, tmp_path):
    out = tmp_path / "paper-zoo"
    res = runner.invoke(app, ["benchmark", "paper", "--data", str(sim_dir), "--seeds", "1",
                              "--out", str(out), "--methods", "base,esmm_mmoe,esmm_ple",
                              "--budget", "base=1", "--budget", "ctr_net=1", *FAST])
    assert res.exit_code == 0, _out(res)
    rows = {r["method"]: r for r in _rows(out / "results.csv")}
    assert set(rows) == {"base", "esmm_mmoe", "esmm_ple", benchmark.CTR_NET}
    assert rows["esmm_mmoe"]["monitor"] == "ctcvr_auc"  # trained on CTCVR, as ESMM
    report = (out / "report.md").read_text()
    assert "| ESMM-MMoE |" in report and "| ESMM-PLE - BASE |" in report


def test_replicate_aucs_equal_sklearn_with_weights_and_ties():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.3).astype(np.float64)
    s = np.round(rng.random(400) + 0.4 * y, 1)  # rounded: many ties
    w = rng.integers(0, 4, size=(5, 400)).astype(np.float64)
    got = benchmark.replicate_aucs(y, s, w)
    for i in range(5):
        assert got[i] == pytest.approx(roc_auc_score(y, s, sample_weight=w[i]), abs=1e-12)
    one_class = benchmark.replicate_aucs(np.ones(4), np.arange(4.0), np.ones((2, 4)))
    assert np.isnan(one_class).all()


def test_cell_summary_uses_the_stats_toolkit_and_pairs_runs():
    import numpy as np

    from esmm import stats

    cell = {"selection": 0.5, "hidden_confounder": 1.0, "cvr": 0.1}
    base, other = [0.60, 0.62, 0.58, 0.61], [0.65, 0.61, 0.66, 0.64]
    loss_b, loss_o = [0.30, 0.31, 0.29, 0.30], [0.28, 0.32, 0.27, 0.29]
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (world, seed)
    rows, reps = [], {0: {}, 1: {}}
    for m, auc, ll in ((benchmark.REFERENCE, base, loss_b), ("esmm", other, loss_o)):
        for (w, s), a, loss in zip(keys, auc, ll, strict=True):
            rows.append({**cell, "world": w, "seed": s, "method": m, "cvr_auc": a,
                         "cvr_auc_entire_space": a, "cvr_logloss_entire_space": loss})
            reps[w][(m, s)] = {k: np.array([a - 0.01, a, a + 0.01]) for k in
                               ("cvr_auc", "cvr_auc_entire_space")}
            reps[w][(m, s)]["cvr_logloss_entire_space"] = np.array([loss] * 3)
    out = benchmark.cell_summary(rows, reps, [benchmark.REFERENCE, "esmm"], cell)
    esmm = out[1]
    est = stats.seed_interval(other)
    assert esmm["cvr_auc_mean"] == pytest.approx(np.mean(other))
    assert (esmm["cvr_auc_seed_low"], esmm["cvr_auc_seed_high"]) == pytest.approx(
        (est.low, est.high))
    d = stats.paired_difference(other, base)
    assert esmm["cvr_auc_minus_base_mean"] == pytest.approx(d.mean)
    assert (esmm["cvr_auc_minus_base_low"], esmm["cvr_auc_wins"]) == (pytest.approx(d.low), 3)
    # Log loss: lower is better, so a win is a lower loss (3 of 4 runs here).
    assert esmm["cvr_logloss_entire_space_wins"] == 3
    # Users: the replicates of the cell are the mean of its runs, replicate by replicate.
    assert esmm["cvr_auc_user_low"] < esmm["cvr_auc_mean"] < esmm["cvr_auc_user_high"]
    assert "cvr_auc_minus_base_mean" not in out[0]


def test_counterfactual_end_to_end_control_oracle_world_seeds_and_reuse(tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "cf"
    knobs = [x for k, v in TINY_WORLD.items() for x in ("--sim-set", f"{k}={v}")]
    # FAST without its evaluation interval: the benchmark sets one (EVALS_PER_EPOCH).
    fast = ["--set", FEATURES, "--set", "model.tower=[8]", "--set", "model.embedding_dim=4",
            "--set", "train.batch_size=500"]
    args = ["benchmark", "counterfactual", "--out", str(out), "--selection", "0,1",
            "--hidden-confounder", "1", "--cvr", "0.2", "--world-seeds", "2", "--seeds", "1",
            "--rows", "2000", "--methods", "escm2_dr,dcmt", "--boot", "20",
            "--set", "train.epochs=1", *knobs, *fast]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    rows = _rows(out / "results.csv")
    methods = {"base", "escm2_dr", "dcmt", benchmark.CONTROL, benchmark.ORACLE}
    # 2 cells x 2 worlds x 1 seed, every method (BASE added) plus the control and oracle.
    assert len(rows) == 2 * 2 * len(methods)
    assert {r["method"] for r in rows} == methods
    assert {(r["selection"], r["world"]) for r in rows} == {
        (s, w) for s in ("0.0", "1.0") for w in ("0", "1")}
    for r in rows:
        assert 0.0 <= float(r["cvr_auc_entire_space"]) <= 1.0, r
    trained = [r for r in rows if r["method"] not in (benchmark.CONTROL, benchmark.ORACLE)]
    assert {r["monitor"] for r in trained} == {benchmark.CF_MONITOR}
    oracle = [r for r in rows if r["method"] == benchmark.ORACLE]
    assert all(float(r["cvr_auc_entire_space"]) > 0.6 for r in oracle)
    assert all(r["cvr_logloss_entire_space"] == "nan" for r in rows
               if r["method"] == benchmark.CONTROL)
    # The worlds differ: each is simulated with its own data seed.
    seeds = {json.loads((out / "data" / "selection1-hidden_confounder1-cvr0.2" / f"world{w}"
                         / "simulation.json").read_text())["seed"] for w in (0, 1)}
    assert seeds == {2018, 2019}
    # Evaluated EVALS_PER_EPOCH times per epoch: 2000 rows / batch 500 = 4 steps -> every 1.
    saved = json.loads(next((out / "runs").rglob("dcmt-seed0/test_result.json")).read_text())
    assert saved["config"]["train"]["eval_every"] == 1
    summary = _rows(out / "summary.csv")
    assert len(summary) == 2 * len(methods)
    dcmt = next(r for r in summary if r["method"] == "dcmt")
    for k in ("cvr_auc_entire_space_seed_low", "cvr_auc_entire_space_user_low",
              "cvr_auc_entire_space_minus_base_mean", "cvr_auc_entire_space_wins"):
        assert dcmt[k] not in ("", "nan"), k
    for k in benchmark.CF_METRICS:
        assert (out / f"{k}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "pCTR as pCVR (control)" in report and "p_conversion (oracle)" in report
    assert f"`{benchmark.CF_MONITOR}`" in report and "95% CI over test users" in report
    # Every CSV column once (the method column was written twice).
    for name in ("results.csv", "summary.csv"):
        header = (out / name).read_text().splitlines()[0].split(",")
        assert len(header) == len(set(header)), name
    # The overview has one row per cell and a column per method; the diagnostics one row per
    # trained method with an interval across the cell's two worlds.
    overview = report.split("## The grid at a glance")[1].split("\n## ")[0]
    assert overview.count("| selection 1, hidden_confounder 1, cvr 0.2 |") == 2
    assert "| ESCM2-DR | DCMT |" in overview
    diag = report.split("### Diagnostics")[1].split("\n## ")[0]
    dcmt_line = next(line for line in diag.splitlines() if line.startswith("| DCMT |"))
    spearman = float(dcmt_line.split("|")[2].split()[0])
    dcmt_runs = [float(r["cvr_ctr_spearman"]) for r in rows if r["method"] == "dcmt"
                 and r["selection"] == "0.0"]
    assert spearman == pytest.approx(sum(dcmt_runs) / 2, abs=1e-3), dcmt_line

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(benchmark, "train", no_training)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    assert _rows(out / "results.csv") == rows


@pytest.mark.parametrize("args,needle", [
    (["--sim-set", "hidden_confounder=1"], "--hidden-confounder"),
    (["--hidden-confounder", "1,1"], "more than once"),
    (["--world-seeds", "0"], "world-seeds"),
    (["--methods", "escm2_ipss"], "escm2_ips"),
])
def test_counterfactual_bad_usage_exits_2(tmp_path, args, needle):
    res = runner.invoke(app, ["benchmark", "counterfactual", *args, "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2, _out(res)
    assert needle in _out(res)
    assert not (tmp_path / "o" / "runs").exists()


def test_bias_sweep_world_seeds_pair_runs_within_worlds_and_give_intervals(tmp_path):
    out = tmp_path / "sweep"
    knobs = [x for k, v in TINY_WORLD.items() for x in ("--sim-set", f"{k}={v}")]
    res = runner.invoke(app, ["benchmark", "bias-sweep", "--out", str(out), "--selection",
                              "1", "--cvr", "0.2", "--seeds", "1", "--world-seeds", "2",
                              "--rows", "2000", "--methods", "base,esmm", "--boot", "20",
                              *knobs, *FAST])
    assert res.exit_code == 0, _out(res)
    rows = _rows(out / "sweep.csv")
    assert {(r["method"], r["world"]) for r in rows} == {
        (m, w) for m in ("base", "esmm", benchmark.CTR_NET) for w in ("0", "1")}
    seeds = {json.loads((out / "data" / "cvr0.2-sel1" / f"world{w}" / "simulation.json")
                        .read_text())["seed"] for w in (0, 1)}
    assert seeds == {2018, 2019}
    # Both runs share train.seed 0, yet they are two pairs: one per world.
    intervals = _rows(out / "intervals.csv")
    esmm = next(r for r in intervals if r["method"] == "esmm")
    assert esmm["cvr_auc_entire_space_pairs"] == "2"
    assert {r["method"] for r in intervals} >= {benchmark.CONTROL, benchmark.ORACLE}
    report = (out / "report.md").read_text()
    assert "Entire-space CVR with intervals" in report and "p_conversion (oracle)" in report
    assert "2 world(s) per cell" in report


def test_paired_diff_never_pairs_runs_of_different_worlds():
    rows = [{"method": "base", "seed": 0, "world": 0, "m": 0.5},
            {"method": "esmm", "seed": 0, "world": 1, "m": 0.9},
            {"method": "base", "seed": 0, "world": 1, "m": 0.6},
            {"method": "esmm", "seed": 0, "world": 0, "m": 0.7}]
    d = benchmark.paired_diff(rows, "esmm", "m")
    assert sorted(d.round(6).tolist()) == [0.2, 0.3]


@pytest.mark.parametrize("cmd", ["paper", "zoo"])
def test_world_seeds_with_given_data_exit_2(tmp_path, sim_dir, cmd):
    res = runner.invoke(app, ["benchmark", cmd, "--data", str(sim_dir), "--world-seeds", "2",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, _out(res)
    assert "--world-seeds 2" in _out(res) and "--data" in _out(res)


def test_world_replicates_do_not_depend_on_the_chunking(monkeypatch):
    import numpy as np

    rng = np.random.default_rng(0)
    n = 300
    t = benchmark.TestScores(truth=(rng.random(n) < 0.3).astype(np.float64),
                             click=(rng.random(n) < 0.5).astype(np.int8),
                             conversion=(rng.random(n) < 0.2).astype(np.int8),
                             users=rng.integers(0, 40, n),
                             scores={("esmm", 0): rng.random(n), (benchmark.ORACLE, 0):
                                     rng.random(n)})
    whole = benchmark.world_replicates(t, 30, seed=1)
    monkeypatch.setattr(benchmark, "_BOOT_CELLS", 7 * n)  # 7 replicates at a time
    chunked = benchmark.world_replicates(t, 30, seed=1)
    for key, metrics in whole.items():
        for m, v in metrics.items():
            assert len(v) == 30
            np.testing.assert_allclose(v, chunked[key][m], rtol=1e-12, atol=1e-15)


def test_oracle_interval_counts_each_world_once():
    import numpy as np

    from esmm import stats

    rows, reps = [], {0: {}, 1: {}, 2: {}}
    for w, a in enumerate((0.80, 0.84, 0.83)):
        for s in (0, 1):  # the oracle's score is the same for every seed of a world
            for m, val in ((benchmark.ORACLE, a), (benchmark.REFERENCE, a - 0.2 + 0.01 * s)):
                rows.append({"world": w, "seed": s, "method": m, "cvr_auc": val,
                             "cvr_auc_entire_space": val, "cvr_logloss_entire_space": 0.1})
                reps[w][(m, s)] = {k: np.array([val]) for k in benchmark.CF_METRICS}
    out = benchmark.cell_summary(rows, reps, [benchmark.REFERENCE, benchmark.ORACLE], {})
    oracle = out[1]
    est = stats.seed_interval([0.80, 0.84, 0.83])
    assert oracle["cvr_auc_runs"] == 3
    assert (oracle["cvr_auc_seed_low"], oracle["cvr_auc_seed_high"]) == pytest.approx(
        (est.low, est.high))


# ----------------------------------------------------------------------------- per-run reports

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # links, not images


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))


def _linked_pages(out):
    """Every link of report.md: each must be relative and resolve to an HTML page with PNG
    plots. Returns the resolved pages."""
    links = _LINK.findall((out / "report.md").read_text())
    pages = []
    for link in links:
        assert not link.startswith(("/", "http")), link
        page = (out / link).resolve()
        assert page.is_file() and page.suffix == ".html", link
        parser = _Page()
        parser.feed(page.read_text())
        assert "html" in parser.tags and parser.images, link
        assert all(src.startswith("data:image/png;base64,") for src in parser.images), link
        pages.append(page)
    return pages


def test_paper_reports_are_linked_and_reused_runs_are_reported(sim_dir, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "paper"
    args = ["benchmark", "paper", "--data", str(sim_dir), "--seeds", "2", "--out", str(out),
            "--methods", "base,esmm", "--budget", "base=1", "--budget", "ctr_net=1", *FAST]
    res = runner.invoke(app, [*args, "--keep-checkpoints"])
    assert res.exit_code == 0, _out(res)
    assert _linked_pages(out) == []
    assert "rerun with `--reports`" in (out / "report.md").read_text()
    # Runs kept with their checkpoints get their pages when reused: nothing retrains.
    monkeypatch.setattr(benchmark, "train", lambda *a, **k: pytest.fail("trained again"))
    res = runner.invoke(app, [*args, "--reports"])
    assert res.exit_code == 0, _out(res)
    pages = _linked_pages(out)
    expected = {out / "runs" / f"{m}-seed{s}" / "report" / "report.html"
                for m in ("base", "esmm", benchmark.CTR_NET) for s in (0, 1)}
    assert set(pages) == {p.resolve() for p in expected}
    assert "| - | 0 | ESMM | 1 | [runs/esmm-seed1/report/report.html]" in (
        out / "report.md").read_text()


def test_reused_runs_without_checkpoints_say_why_they_have_no_page(sim_dir, tmp_path):
    out = tmp_path / "paper"
    args = ["benchmark", "paper", "--data", str(sim_dir), "--seeds", "1", "--out", str(out),
            "--methods", "esmm", *FAST]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, [*args, "--reports"])
    assert res.exit_code == 0, _out(res)
    assert _linked_pages(out) == []
    assert "| - | 0 | ESMM | 0 | none (checkpoints deleted; `--fresh` retrains) |" in (
        out / "report.md").read_text()


def test_zoo_sweep_and_counterfactual_link_their_reports(sim_dir, tmp_path):
    knobs = [x for k, v in TINY_WORLD.items() for x in ("--sim-set", f"{k}={v}")]
    zoo = tmp_path / "zoo"
    res = runner.invoke(app, ["benchmark", "zoo", "--data", str(sim_dir), "--seeds", "1",
                              "--out", str(zoo), "--methods", "esmm,shared_bottom",
                              "--reports", *FAST])
    assert res.exit_code == 0, _out(res)
    assert len(_linked_pages(zoo)) == 2
    sweep = tmp_path / "sweep"
    res = runner.invoke(app, ["benchmark", "bias-sweep", "--out", str(sweep), "--selection",
                              "0,1", "--cvr", "0.2", "--seeds", "1", "--rows", "2000",
                              "--methods", "esmm", "--reports", *knobs, *FAST])
    assert res.exit_code == 0, _out(res)
    pages = _linked_pages(sweep)
    assert {p.parent.parent.parent.name for p in pages} == {"cvr0.2-sel0", "cvr0.2-sel1"}
    assert "| cvr 0.2, selection 1 | 0 | ESMM | 0 |" in (sweep / "report.md").read_text()
    cf = tmp_path / "cf"
    res = runner.invoke(app, ["benchmark", "counterfactual", "--out", str(cf), "--selection",
                              "1", "--hidden-confounder", "1", "--cvr", "0.2", "--world-seeds",
                              "1", "--seeds", "1", "--rows", "2000", "--methods", "esmm",
                              "--boot", "10", "--reports", "--set", "train.epochs=1", *knobs,
                              *FAST[:6]])
    assert res.exit_code == 0, _out(res)
    # ESMM, BASE (always added) and BASE's reference CTR net.
    assert len(_linked_pages(cf)) == 3
