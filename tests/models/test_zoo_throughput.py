"""bench/zoo_throughput.py: its runs train what they claim, on the same shapes in esmm and
torch-rechub, and a measuring process that dies is reported, not waited for."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import zoo_throughput  # noqa: E402  (a script beside the package, not part of it)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo-rows")
    zoo_throughput.simulate(d, 3000)
    return d


def test_a_measuring_process_that_dies_is_reported():
    result = zoo_throughput.run(os._exit, (3,), 1)
    assert result == {"error": "the measuring process ended with exit code 3 and no result"}


@pytest.mark.parametrize("backbone", ["mmoe", "ple"])
def test_esmm_and_rechub_train_the_same_shapes_step_by_step(rows, backbone):
    pytest.importorskip("torch_rechub")
    mine = zoo_throughput.esmm_steps(rows, backbone, 512, 3)
    theirs = zoo_throughput.rechub_steps(rows, backbone, 512, 3)
    for r in (mine, theirs):
        assert r["samples"] == [512, 512, 512]
        assert r["start"] < r["stamps"][0] < r["stamps"][1] < r["stamps"][2]
        assert zoo_throughput.timed_rate(r, 1) == pytest.approx(
            1024 / (r["stamps"][2] - r["stamps"][0]))
    assert mine["rows"] == theirs["rows"]
    # Same tables, experts and towers: rechub's bag tables carry one padding row each.
    assert abs(mine["params"] - theirs["params"]) < 1e-3 * mine["params"]
