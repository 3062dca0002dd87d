"""docs/quickstart.py runs from start to end, at a small size, and writes what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.py"


def test_quickstart_runs_and_writes_its_chart_runs_and_artifact(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESMM_QUICKSTART_ROWS", "10000")
    ns = runpy.run_path(str(QUICKSTART), run_name="__main__")
    out = tmp_path / "quickstart-out"
    png = (out / "quickstart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    for name in ("esmm", "base"):
        assert (out / "runs" / name / "checkpoints" / "best.pt").is_file()
        assert ns["runs"][name].config.model.name == name
    assert (out / "esmm.pt").is_file()
    table = ns["table"]
    assert list(table.index) == ["esmm", "base"]
    assert table.notna().all().all() and ((table > 0) & (table < 1)).all().all()
    assert ns["diff"] < 1e-5  # the artifact scores raw rows as the run does
    assert "artifact against the run on 1000 rows" in capsys.readouterr().out


def test_quickstart_is_a_percent_format_notebook():
    text = QUICKSTART.read_text()
    assert "format_name: percent" in text
    cells = [line for line in text.splitlines() if line.startswith("# %%")]
    assert len(cells) >= 10 and any("[markdown]" in c for c in cells)
    compile(text, str(QUICKSTART), "exec")
    assert pytest.importorskip("matplotlib")
