# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # esmm quickstart
#
# Simulate impressions whose ground truth is known, train ESMM and the paper's BASE on them,
# compare their metrics, plot them, export ESMM to one file and score rows with that file.
#
# Open this file as a notebook with Jupytext (`jupyter lab docs/quickstart.py`), or run it
# as a script: `python docs/quickstart.py`. It writes its runs, a chart and an artifact into
# the folder it runs in. `ESMM_QUICKSTART_ROWS` sets the number of training impressions
# (default 100,000: `python docs/quickstart.py` took 54 s on 2 shared cores; the test suite
# runs it with 10,000). In Jupyter, the `notebook` extra shows training progress as a widget.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: the same in a notebook, a script and CI
import matplotlib.pyplot as plt
import pandas as pd

import esmm
from esmm.config import feature_preset

ROWS = int(os.environ.get("ESMM_QUICKSTART_ROWS", "100000"))
OUT = Path("quickstart-out")

# %% [markdown]
# ## 1. Data
#
# `esmm.simulate` draws splits of one simulated world (preset `dense`: about 4% clicks and
# 10% conversions per click; see docs/simulator.md). Each split is a pair of Arrow tables:
# impressions, and users joined to them by `common_key`. Every data argument of esmm takes
# such a pair, a single table, a pandas DataFrame, or a path.

# %%
splits = esmm.simulate({"train": ROWS, "valid": ROWS // 4, "test": ROWS // 2},
                       preset="dense", seed=7)
impressions, users = splits["train"]
print(f"{impressions.num_rows} training impressions, {users.num_rows} users")
print(impressions.slice(0, 5).to_pandas()[["sample_id", "common_key", "205", "click",
                                           "conversion", "p_click", "p_conversion"]])

# %% [markdown]
# ## 2. Train ESMM and BASE
#
# One config for both; keyword arguments override its keys, with `__` for the dots of a key
# (`model__name="base"` sets `model.name`). `eval` is the split early stopping watches.

# %%
config = {
    # Every Ali-CCP field, with hash buckets scaled to this data: a few thousand users and
    # items do not need the full preset's 1.9 million rows of embeddings.
    "features": feature_preset("aliccp", buckets_scale=0.05),
    "model": {"name": "esmm", "tower": [64, 32], "embedding_dim": 8},
    "train": {"batch_size": 1024, "epochs": 3, "optimizer": {"name": "adam", "lr": 0.003},
              "seed": 0, "early_stop": {"patience": 2}},
}
runs = {}
for name in ("esmm", "base"):
    runs[name] = esmm.fit(config, train=splits["train"], eval=splits["valid"],
                          out=OUT / "runs" / name, model__name=name)
    print(runs[name])

# %% [markdown]
# ## 3. Compare on the test split
#
# `cvr_auc_entire_space` ranks every test impression's pCVR against whether it would have
# converted had it been clicked: only a simulator knows that. `cvr_auc` uses the clicked
# impressions alone, as real logs allow.

# %%
# Which model wins depends on the data: with this preset's many conversions BASE is often
# ahead; the README and docs/results.md map where entire-space modelling pays.
KEY = ["cvr_auc_entire_space", "ctcvr_auc", "cvr_auc", "ctr_auc"]
test = {name: run.evaluate(splits["test"]) for name, run in runs.items()}
table = pd.DataFrame({name: {k: m[k] for k in KEY} for name, m in test.items()}).T
print(table.round(4))

# %% [markdown]
# ## 4. Plot
#
# Entire-space CVR AUC on the validation split as training went (`Run.history`, one row per
# evaluation), and the test metrics side by side.

# %%
fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
for name, run in runs.items():
    h = run.history
    curves.plot(h["samples"], h["cvr_auc_entire_space"], marker="o", label=name)
curves.set(xlabel="training samples", ylabel="cvr_auc_entire_space",
           title="Validation split")
curves.legend()
table.T.plot.bar(ax=bars, rot=20, ylim=(0.4, max(0.8, table.to_numpy().max() + 0.05)))
bars.set(ylabel="AUC", title="Test split")
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "quickstart.png", dpi=100)
print(f"chart written to {OUT / 'quickstart.png'}")

# %% [markdown]
# ## 5. Export and score with the artifact
#
# `Run.export` writes one TorchScript (or, with the `serve` extra, ONNX) file holding the
# model, its feature spec and metadata, after checking it against the trained model.
# `esmm.load` of that file gives a `Predictor` that hashes raw ids itself: what `esmm serve`
# runs behind its HTTP API.

# %%
meta = runs["esmm"].export(OUT / "esmm.pt", "torchscript")
print("parity max abs diff:", meta["parity"]["max_abs_diff"])
scorer = esmm.load(OUT / "esmm.pt")

test_impressions, test_users = splits["test"]
rows = test_impressions.slice(0, 1000).to_pandas().merge(test_users.to_pandas(),
                                                         on="common_key", how="left")
scores = scorer.predict_columns({c: rows[c].tolist() for c in rows.columns})
reference = runs["esmm"].predict(rows, keep=["sample_id"])
diff = max(abs(scores[k] - reference[k].to_numpy()).max() for k in ("p_ctr", "p_cvr", "p_ctcvr"))
print(f"artifact against the run on {len(rows)} rows: max abs diff {diff:.2e}")
print(reference.head())
