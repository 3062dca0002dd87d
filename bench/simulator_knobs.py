"""What each selection knob of the simulator does, measured on simulated impressions.

Each row changes knobs of a preset (``dense`` by default) and measures one split with
:func:`esmm.data.simulate.selection_effects`:

    shift       click-weighted displacement of the conversion-relevant factors (r, r_orth), in
                standard deviations of r: observed selection, in any direction
    rho_obs     Spearman of the click and conversion logits without the hidden term: the
                propensity correlation the features show
    rho_true    Spearman(p_click, p_conversion) over all rows (the hidden term included)
    lift        click-weighted mean p_conversion over the mean: the clicked sample's excess
    confound    click-weighted mean p_conversion over the same mean of the conversion
                probability given the features only: 1 = selection ignorable given features
    auc_click   AUC of p_conversion for conversion_if_clicked on the drawn clicks
    auc_all     the same over all impressions
    auc_p_click AUC of p_click for conversion_if_clicked over all impressions

    python bench/simulator_knobs.py --markdown
    python bench/simulator_knobs.py --preset aliccp --rows 500000 --seed 3
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from esmm.data.simulate import get_preset, selection_effects

SETTINGS: tuple[dict[str, Any], ...] = (
    {},
    {"selection": 0.0},
    {"selection": 1.0},
    {"selection_correlation": 0.0},
    {"selection_correlation": 0.0, "selection": 1.0},
    {"selection_correlation": 0.5},
    {"selection_correlation": -1.0},
    {"hidden_confounder": 0.5},
    {"hidden_confounder": 1.0},
    {"clickbait_fraction": 0.0},
    {"clickbait_fraction": 0.0, "selection": 0.0},
)
COLUMNS = (("shift", "covariate_shift"), ("rho_obs", "spearman_observed"),
           ("rho_true", "spearman_p_click_p_conversion"), ("lift", "clicked_p_conversion_ratio"),
           ("confound", "confounding"), ("auc_click", "auc_clicked"),
           ("auc_all", "auc_entire_space"), ("auc_p_click", "auc_p_click_entire_space"))


def measure(preset: str, rows: int, seed: int) -> list[tuple[str, dict[str, float]]]:
    out = []
    for knobs in SETTINGS:
        label = ", ".join(f"{k}={v:g}" for k, v in knobs.items()) or "(preset)"
        out.append((label, selection_effects(get_preset(preset, **knobs), rows, seed)))
    return out


def table(results: list[tuple[str, dict[str, float]]], markdown: bool) -> str:
    head = ["knobs", *(c for c, _ in COLUMNS)]
    body = [[label, *(f"{m[key]:.3f}" for _, key in COLUMNS)] for label, m in results]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| `" + r[0] + "` | " + " | ".join(r[1:]) + " |" for r in body]
        return "\n".join(lines)
    width = max(len(r[0]) for r in body)
    fmt = f"{{:<{width}}}" + "  {:>11}" * len(COLUMNS)
    return "\n".join(fmt.format(*r) for r in [head, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dense")
    ap.add_argument("--rows", type=int, default=200_000, help="impressions per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    results = measure(a.preset, a.rows, a.seed)
    print(table(results, a.markdown))
    print(f"\npreset {a.preset}, {a.rows} impressions per setting, seed {a.seed}, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
