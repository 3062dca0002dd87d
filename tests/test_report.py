"""esmm report: the HTML page parsed back, every image decoded; its numerics against sklearn."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.metrics import auc, grouped_auc
from esmm.report import build_report, per_group_auc, reliability_bins, roc_points
from esmm.train import train
from tests.conftest import cli_output, small_config

TITLES = ["Training and validation losses", "Validation metrics", "ROC curves",
          "Reliability diagrams", "Score histograms by label", "Per-user AUC",
          "pCVR against the true conversion probability"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.external: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a and not str(a[key]).startswith("data:"):
                self.external.append(f"{tag} {a[key]}")
        self._in_td = tag == "td"

    def handle_endtag(self, tag):
        self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def _parse(path):
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _decode_png(src):
    import matplotlib.pyplot as plt

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = plt.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


@pytest.fixture(scope="module")
def run(flat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = config_from_dict(small_config(flat_data["train"], flat_data["valid"], eval_every=10,
                                        max_steps=30))
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def page(run, tmp_path_factory):
    """``esmm report RUN --data eval --out DIR`` run once through the CLI."""
    out = tmp_path_factory.mktemp("page")
    res = CliRunner().invoke(app, ["report", str(run), "--data", "eval", "--out", str(out)])
    assert res.exit_code == 0, cli_output(res)
    assert f"wrote {out / 'report.html'}" in res.output
    return out / "report.html"


def test_the_page_is_self_contained_and_every_image_decodes(page):
    assert [p.name for p in page.parent.iterdir()] == ["report.html"]
    parsed = _parse(page)
    assert [img["alt"] for img in parsed.images] == TITLES
    for img in parsed.images:
        _decode_png(img["src"])
    assert parsed.external == []


def test_the_metrics_table_holds_the_evaluation_of_the_best_checkpoint(run, page, flat_data):
    from esmm.checkpoint import load_model
    from esmm.data.stream import open_split
    from esmm.evaluate import evaluate

    model, cfg, spec, ck = load_model(run)
    metrics = evaluate(model, open_split(flat_data["valid"], spec, cfg.data))
    parsed = _parse(page)
    table = dict(zip(parsed.cells[::2], parsed.cells[1::2], strict=True))
    for name in ("ctr_auc", "cvr_auc", "ctcvr_logloss", "ctr_pcoc", "cvr_auc_entire_space"):
        assert table[name] == f"{metrics[name]:.5f}"
    assert table["n_impressions"] == "4000"
    assert table["checkpoint step"] == str(ck["step"])
    assert table["data"] == str(flat_data["valid"])


def test_without_ground_truth_or_users_those_plots_are_left_out(run, tmp_path, flat_data):
    t = pq.read_table(flat_data["valid"]).drop_columns(
        ["p_click", "p_conversion", "conversion_if_clicked"])
    pq.write_table(t, tmp_path / "plain.parquet")
    parsed = _parse(build_report(run, tmp_path / "rep", data=tmp_path / "plain.parquet"))
    assert [img["alt"] for img in parsed.images] == TITLES[:-1]
    for img in parsed.images:
        _decode_png(img["src"])


def test_cli_report_errors_are_one_line_with_exit_2(run, tmp_path):
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "o"),
                                   "--data", "test"])
    assert res.exit_code == 2
    assert set(cli_output(res).strip().splitlines()) == {
        "esmm: error: --data test: the run's config has no data.test; pass a path or another "
        "split (train, eval, test)"}
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope"), "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code == 2
    assert set(cli_output(res).strip().splitlines()) == {
        f"esmm: error: RUN {tmp_path / 'nope'}: does not exist; expected a run folder (esmm "
        "train --out)"}
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- numerics


def _ties(n, rng):
    return np.round(rng.random(n), 1)  # few distinct scores: many ties


def test_per_group_auc_matches_sklearn_per_group_and_grouped_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 3000
    g = rng.integers(0, 60, n)
    s = _ties(n, rng)
    y = (rng.random(n) < 0.2 + 0.5 * s).astype(np.int64)
    y[g == 7] = 0  # a group with one class is left out
    aucs, sizes = per_group_auc(y, s, g)
    expected = [(roc_auc_score(y[g == k], s[g == k]), (g == k).sum())
                for k in np.unique(g) if 0 < y[g == k].sum() < (g == k).sum()]
    assert aucs == pytest.approx([e[0] for e in expected], abs=1e-12)
    assert sizes.tolist() == [e[1] for e in expected]
    assert np.sum(sizes * aucs) / np.sum(sizes) == pytest.approx(grouped_auc(y, s, g),
                                                                  abs=1e-12)


def test_roc_points_match_sklearn():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(1)
    s = _ties(2000, rng)
    y = (rng.random(2000) < s).astype(np.int64)
    fpr, tpr = roc_points(y, s)
    ref_fpr, ref_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert fpr == pytest.approx(ref_fpr, abs=1e-12) and tpr == pytest.approx(ref_tpr, abs=1e-12)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # the trapezoids under the curve
    assert area == pytest.approx(auc(y, s), abs=1e-12)
    assert roc_points(np.zeros(5), s[:5])[0].size == 0


def test_reliability_bins_are_equal_count_and_exact():
    rng = np.random.default_rng(2)
    p = rng.random(1003)
    y = (rng.random(1003) < p).astype(np.int64)
    b = reliability_bins(y, p, bins=10)
    assert b["count"].sum() == 1003 and b["count"].max() - b["count"].min() <= 1
    assert np.all(np.diff(b["pred"]) > 0)  # bins follow the predictions
    order = np.argsort(p, kind="stable")
    first = order[:int(b["count"][0])]
    assert b["pred"][0] == pytest.approx(p[first].mean())
    assert b["observed"][0] == pytest.approx(y[first].mean())
    assert np.sum(b["count"] * b["observed"]) == pytest.approx(y.sum())
