"""Heads: per-task logits in, named probabilities and named losses out.

Every model ends in one of these, so each multi-task loss is written once:

    independent    loss_ctr = BCE(click, pCTR)                  over all impressions
                   loss_cvr = BCE(conversion, pCVR)             over clicked impressions
                   pCTCVR = pCTR * pCVR                         (BASE, plain multi-task models)
    entire_space   loss_ctr   = BCE(click, pCTR)                over all impressions
                   loss_ctcvr = BCE(click * conversion, pCTR * pCVR)  over all impressions
                   pCVR from its own tower, with no direct label   (ESMM, Ma et al. SIGIR 2018)
    ctcvr          loss_ctr   = BCE(click, pCTR)                over all impressions
                   loss_ctcvr = BCE(click * conversion, pCTCVR) over all impressions
                   pCTCVR from its own tower; pCVR = min(pCTCVR / pCTR, clip)
                   (DIVISION; AITM's click -> purchase tasks)

Products and ratios of probabilities are taken in log space: pCTCVR never underflows to 0
before the loss sees it, and pCVR = pCTCVR / pCTR never divides two rounded numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from esmm.losses import bce_product_of_logits, bce_with_logits, log1mexp

# Largest log pCVR turned into a finite logit: pCVR = 1 maps to logit ~ 16.1 in ``outputs``.
_MAX_LOG_P = -1e-7


def loss_ctr(ctr_logit: torch.Tensor, batch) -> torch.Tensor:
    """BCE(click, sigmoid(ctr_logit)) over all impressions: (B,) -> scalar."""
    return bce_with_logits(ctr_logit, batch.click, batch.weight)


def product_probs(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """``p_ctr``, ``p_cvr`` and ``p_ctcvr = p_ctr * p_cvr`` (log space), each (B,)."""
    return {
        "p_ctr": torch.sigmoid(ctr_logit),
        "p_cvr": torch.sigmoid(cvr_logit),
        "p_ctcvr": torch.exp(F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)),
    }


class Head:
    """Base class. ``second`` names the logit of the second tower (``cvr_logit`` or
    ``ctcvr_logit``); ``monitor`` is the validation log loss of the tasks it trains;
    ``ctcvr_below_ctr``: pCTCVR <= pCTR holds by construction."""

    name = ""
    loss_names: tuple[str, ...] = ("loss_ctr", "loss_ctcvr")
    second = "cvr_logit"
    monitor = "ctr_logloss+ctcvr_logloss"
    benchmark_monitor = "ctcvr_auc"
    clicked_only = False
    ctcvr_below_ctr = True

    def outputs(self, ctr_logit: torch.Tensor, second_logit: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """The model's ``forward`` result from the two towers' logits, each (B,)."""
        return {"ctr_logit": ctr_logit, self.second: second_logit}

    def predict(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return product_probs(out["ctr_logit"], out["cvr_logit"])

    def losses(self, out: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract


class IndependentHead(Head):
    """CTR over all impressions, CVR over clicked impressions (BASE's losses)."""

    name = "independent"
    loss_names = ("loss_ctr", "loss_cvr")
    monitor = "ctr_logloss+cvr_logloss"
    benchmark_monitor = "cvr_auc"
    clicked_only = True

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        w = batch.click if batch.weight is None else batch.click * batch.weight
        return {
            "loss_ctr": loss_ctr(out["ctr_logit"], batch),
            "loss_cvr": bce_with_logits(out["cvr_logit"], batch.conversion, w),
        }


class EntireSpaceHead(Head):
    """ESMM: CTR and CTCVR = CTR * CVR, both over all impressions."""

    name = "entire_space"

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        a, b = out["ctr_logit"], out["cvr_logit"]
        return {
            "loss_ctr": loss_ctr(a, batch),
            "loss_ctcvr": bce_product_of_logits([a, b], batch.click * batch.conversion,
                                                batch.weight),
        }


class CtcvrHead(Head):
    """CTR and CTCVR towers over all impressions; pCVR = min(pCTCVR / pCTR, clip).

    ``outputs`` also returns ``cvr_logit``, the logit of the clipped ratio (finite: a ratio of
    1 maps to about 16.1), so every model's forward has a CVR logit.
    """

    name = "ctcvr"
    second = "ctcvr_logit"
    ctcvr_below_ctr = False

    def __init__(self, clip: float = 1.0) -> None:
        self.clip = clip

    def log_p_cvr(self, ctr_logit: torch.Tensor, ctcvr_logit: torch.Tensor) -> torch.Tensor:
        """log pCVR = min(log pCTCVR - log pCTR, log clip): (B,), <= 0."""
        ratio = F.logsigmoid(ctcvr_logit) - F.logsigmoid(ctr_logit)
        return ratio.clamp(max=math.log(self.clip))

    def outputs(self, ctr_logit, second_logit) -> dict[str, torch.Tensor]:
        lp = self.log_p_cvr(ctr_logit, second_logit).clamp(max=_MAX_LOG_P)
        return {"ctr_logit": ctr_logit, "ctcvr_logit": second_logit,
                "cvr_logit": lp - log1mexp(lp)}

    def predict(self, out) -> dict[str, torch.Tensor]:
        a, c = out["ctr_logit"], out["ctcvr_logit"]
        return {
            "p_ctr": torch.sigmoid(a),
            "p_cvr": torch.exp(self.log_p_cvr(a, c)),
            "p_ctcvr": torch.sigmoid(c),
        }

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        return {
            "loss_ctr": loss_ctr(out["ctr_logit"], batch),
            "loss_ctcvr": bce_with_logits(out["ctcvr_logit"], batch.click * batch.conversion,
                                          batch.weight),
        }


HEADS: dict[str, type[Head]] = {h.name: h for h in (IndependentHead, EntireSpaceHead, CtcvrHead)}


def make_head(name: str) -> Head:
    """The head called ``name`` with its defaults."""
    return HEADS[name]()
