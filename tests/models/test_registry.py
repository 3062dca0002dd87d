"""The registry holds every per-model fact; tables and defaults elsewhere are read from it."""

import re
from pathlib import Path

import pytest

from esmm import benchmark, demo
from esmm.models import entries, get_entry, model_names, reference_entry
from esmm.models.catalog import models_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_models_table_is_the_generated_one():
    assert models_table() in (ROOT / "README.md").read_text()


def test_every_model_is_in_the_generated_table_and_docs():
    table = models_table()
    docs = (ROOT / "docs" / "models.md").read_text()
    for name in model_names():
        assert f"| `{name}` |" in table
        assert f"`{name}`" in docs, name


def test_benchmark_tables_come_from_the_registry():
    assert benchmark.PAPER_METHODS == ("base", "aman", "oversampling", "unbias", "division",
                                       "esmm_ns", "esmm")
    assert benchmark.SWEEP_METHODS == ("base", "division", "esmm_ns", "esmm")
    assert demo.DEMO_MODELS == ("base", "esmm_ns", "esmm")
    assert benchmark.CTR_NET_MODEL == reference_entry().name == "base"
    for e in entries():
        assert benchmark.MONITOR[e.name] == e.benchmark_monitor
        assert benchmark.DISPLAY[e.name] == e.display
    assert benchmark.PAPER_TABLE2["esmm"] == (68.56, 0.37, 65.32, 0.49)


@pytest.mark.parametrize("path", ["benchmark.py", "demo.py", "cli.py", "train.py",
                                  "evaluate.py", "export.py", "serve.py"])
def test_no_model_name_literal_outside_models(path):
    text = (ROOT / "src" / "esmm" / path).read_text().replace('getLogger("esmm")', "")
    names = "|".join(re.escape(n) for n in model_names())
    # A quoted model name in code (docstrings and help texts name models in prose with
    # backticks or capitals, never as a quoted literal).
    hits = re.findall(rf"""["']({names})["']""", text)
    assert not hits, f"{path}: model name literals {hits}"


def test_zoo_pairs_share_backbone_and_differ_in_head():
    for b in ("shared_bottom", "mmoe", "ple", "dbmtl", "aitm"):
        plain, esmm = get_entry(b), get_entry(f"esmm_{b}")
        assert plain.backbone == esmm.backbone == b
        assert esmm.head == "entire_space" and plain.head != "entire_space"
        assert "zoo" in plain.benchmarks and "zoo" in esmm.benchmarks


@pytest.mark.parametrize("cmd", [["demo"], ["benchmark", "paper"], ["benchmark", "zoo"],
                                 ["benchmark", "bias-sweep"]])
def test_unknown_model_in_a_list_exits_2_naming_it(tmp_path, cmd):
    from typer.testing import CliRunner

    from esmm.cli import app
    from tests.conftest import cli_output

    flag = "--models" if cmd == ["demo"] else "--methods"
    res = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "o"), flag, "esmm,mmoee"])
    assert res.exit_code == 2, cli_output(res)
    assert "mmoee" in cli_output(res) and "esmm_mmoe" in cli_output(res)
    assert not (tmp_path / "o").exists()
