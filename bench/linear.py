"""A tower's matrix products on the CPU: MKL (``F.linear``) against oneDNN (esmm's ``Linear``).

For each layer width of ``--tower`` over ``--in-dim`` inputs and a batch of ``--batch`` rows:
the forward product, the forward product with its ReLU fused (evaluation), and forward plus
backward (training), each the median of ``--repeats`` timed runs after one warm-up, MKL and
oneDNN interleaved so that load from other work hits both alike. GFLOP/s counts 2 B K N per
product (three products for forward plus backward).

    python bench/linear.py --markdown
    python bench/linear.py --threads 2 --batch 4096 --tower 256,128,64 --in-dim 224
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import esmm.nn.mlp as mlp


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def train_step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, onednn: bool) -> None:
    """Forward and backward of one layer: (B, K) @ (N, K)^T + (N,)."""
    y = mlp.linear(x, w, b) if onednn else F.linear(x, w, b)
    y.backward(torch.ones_like(y))
    x.grad = w.grad = b.grad = None


def measure(batch: int, k: int, n: int, repeats: int) -> list[tuple[str, float, float]]:
    """(phase, MKL s, oneDNN s) for one layer."""
    x = torch.randn(batch, k)
    w, b = torch.randn(n, k) * k ** -0.5, torch.zeros(n)
    rows = []
    with torch.inference_mode():
        rows.append(("forward", timed(lambda: F.linear(x, w, b), repeats),
                     timed(lambda: mlp.linear(x, w, b), repeats)))
        rows.append(("forward + ReLU", timed(lambda: F.relu(F.linear(x, w, b)), repeats),
                     timed(lambda: mlp.linear(x, w, b, relu=True), repeats)))
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    rows.append(("forward + backward", timed(lambda: train_step(xg, wg, bg, False), repeats),
                 timed(lambda: train_step(xg, wg, bg, True), repeats)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--in-dim", type=int, default=224)
    ap.add_argument("--tower", default="256,128,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if mlp._LINEAR is None:
        raise SystemExit("this torch build has no oneDNN linear op: nothing to compare")
    torch.set_num_threads(args.threads)
    widths = [args.in_dim] + [int(w) for w in args.tower.split(",")]
    print("| layer | phase | MKL ms | oneDNN ms | MKL GFLOP/s | oneDNN GFLOP/s | speed-up |"
          if args.markdown else "layer phase mkl_ms onednn_ms mkl_gflops onednn_gflops speedup")
    if args.markdown:
        print("|---|---|---:|---:|---:|---:|---:|")
    for k, n in zip(widths, widths[1:], strict=False):
        for phase, t_mkl, t_dnn in measure(args.batch, k, n, args.repeats):
            flops = 2 * args.batch * k * n * (3 if "backward" in phase else 1)
            cells = [f"{k}x{n}", phase, f"{t_mkl * 1e3:.2f}", f"{t_dnn * 1e3:.2f}",
                     f"{flops / t_mkl / 1e9:.1f}", f"{flops / t_dnn / 1e9:.1f}",
                     f"{t_mkl / t_dnn:.2f}"]
            print("| " + " | ".join(cells) + " |" if args.markdown else " ".join(cells))
    print(f"\nbatch {args.batch}, torch threads {args.threads}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
