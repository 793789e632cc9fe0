"""The basis-refresh benchmark: how long one GaLore subspace refresh takes, and how good the basis is.

The refresh is :meth:`optimlib.optim.galore.projection.Projector.refresh`, called exactly as
:class:`optimlib.optim.galore.GaLoreAdamW` calls it (a fresh one-process :class:`RowBlock` and
:class:`Projector` over the whole matrix, a per-parameter seed, ``proj_type="std"``), followed by
the materialization of the basis the next projection uses (``Projector.basis``: a lookup for
svd/randomized, the DCT rows from the indices, the seeded QR for ``random``), once per backend,
timed with interleaved repetitions.

The gradient is synthetic but shaped like a real one: a rank-``2 r`` signal with a power-law
spectrum ``s_i = (i + 1) ** -decay`` (seeded Gaussian factors, so the singular vectors are
generic) plus i.i.d. Gaussian noise carrying a fraction ``noise`` of the signal's Frobenius
norm -- a decaying spectrum with a full-rank tail, the regime GaLore's refresh works in.

Quality, for each basis ``P`` (as the projector stores it):

* ``residual``: ``||G - proj(G)||_F / ||G||_F``, the relative error of projecting the gradient
  on the basis (``proj`` = ``Projector.up(Projector.down(G))``); the exact SVD's residual is the
  optimum for that rank;
* ``excess``: ``residual / residual_svd - 1``;
* ``overlap``: ``||P_svd^T P||_F^2 / r``, the mean squared cosine of the principal angles between
  the subspace and the exact one (1: the same subspace), and ``max_angle_deg``, the largest
  principal angle.  With a slowly decaying spectrum the last directions of the exact top-``r``
  subspace are nearly degenerate with the next ones, so a good approximate basis can have a
  large largest angle yet almost no excess residual: read the residual first.
"""

from __future__ import annotations

import math

import torch

from optimlib.bench.memory import resolve_device
from optimlib.bench.report import environment, markdown_table
from optimlib.bench.timing import interleaved, summarize

__all__ = ["synthetic_gradient", "run_refresh_benchmark", "refresh_markdown", "parse_shape"]


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x11008"`` -> ``(4096, 11008)``."""
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"invalid shape={text!r}: expected MxN, e.g. 4096x11008") from None
    if m < 1 or n < 1:
        raise ValueError(f"invalid shape={text!r}: both sides must be >= 1")
    return m, n


def synthetic_gradient(m: int, n: int, *, signal_rank: int, decay: float = 1.0, noise: float = 0.1,
                       seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded ``(m, n)`` float32 gradient with a decaying spectrum (see the module docstring)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = max(1, min(signal_rank, m, n))
    a = torch.randn(m, k, generator=gen) / math.sqrt(m)
    b = torch.randn(k, n, generator=gen) / math.sqrt(n)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    g = (a * s) @ b
    if noise > 0:
        eps = torch.randn(m, n, generator=gen)
        g += eps * (noise * g.norm() / eps.norm())
    return g.to(device)


def _projector(shape, rank: int, projection: str, oversample: int, power_iters: int):
    from optimlib.distributed.row_block import FlatSlice, RowBlock
    from optimlib.optim.galore.projection import ProjectionConfig, Projector

    config = ProjectionConfig(rank=rank, projection=projection, proj_type="std", oversample=oversample,
                              power_iters=power_iters).validate()
    return Projector(config, RowBlock(shape, FlatSlice.whole(shape[0] * shape[1])), name="bench.refresh")


def _columns(projector, state: dict) -> torch.Tensor:
    """The basis as orthonormal columns in the space it spans (``n x r`` right, ``m x r`` left)."""
    p = projector.basis(state, dtype=torch.float64)
    return p.t() if projector.side == "right" else p


def run_refresh_benchmark(shape: tuple[int, int] = (4096, 11008), rank: int = 512,
                          projections: tuple[str, ...] = ("svd", "randomized"), *, reps: int = 3, warmup: int = 0,
                          oversample: int = 8, power_iters: int = 2, decay: float = 1.0, noise: float = 0.1,
                          seed: int = 0, device: str = "cpu", progress=None) -> dict:
    """Time ``Projector.refresh`` per backend and measure each basis' quality (module docstring)."""
    from optimlib.optim.galore.bases import PROJECTIONS, name_seed

    bad = [p for p in projections if p not in PROJECTIONS or p == "auto"]
    if bad:
        raise ValueError(f"invalid projections {bad}: accepted values are svd, randomized, dct, random")
    if "svd" not in projections:
        projections = ("svd",) + tuple(projections)
    dev = resolve_device(device)
    m, n = shape
    if progress:
        progress(f"building a {m}x{n} gradient ...")
    grad = synthetic_gradient(m, n, signal_rank=2 * rank, decay=decay, noise=noise, seed=seed, device=dev)
    projectors = {p: _projector(shape, rank, p, oversample, power_iters) for p in projections}
    states = {p: {"step": 0, "seed": name_seed("bench.refresh", seed)} for p in projections}

    def task(p):
        def run():
            # What a refresh step pays before it can project: GaLoreAdamW builds a Projector per
            # step, refreshes, and the first projection materializes the basis (for ``random``
            # and ``dct`` that is where the basis matrix is computed from the seed / indices).
            states[p].pop("refreshes", None)       # the same seed every repetition
            projectors[p] = _projector(shape, rank, p, oversample, power_iters)
            projectors[p].refresh(states[p], grad)
            projectors[p].basis(states[p], dtype=grad.dtype)
        return run

    if progress:
        progress(f"timing {', '.join(projections)} x {reps} interleaved rounds ...")
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    samples = interleaved({p: task(p) for p in projections}, reps=reps, warmup=warmup, sync=sync)

    g64 = grad.double()
    gnorm = g64.norm()
    ref = _columns(projectors["svd"], states["svd"])
    rows = []
    for p in projections:
        proj, state = projectors[p], states[p]
        recon = proj.up(state, proj.down(state, grad)).double()
        residual = float((g64 - recon).norm() / gnorm)
        cols = _columns(proj, state)
        cos = torch.linalg.svdvals(ref.t() @ cols).clamp(max=1.0)
        s = summarize(samples[p])
        rows.append({"projection": p, "side": proj.side, "rank": int(state["rank"]), "seconds": s["median"],
                     "seconds_q1": s["q1"], "seconds_q3": s["q3"], "residual": residual,
                     "overlap": float((cos ** 2).sum() / ref.shape[1]),
                     "max_angle_deg": float(torch.rad2deg(torch.arccos(cos.min()))) if cos.numel() else 0.0})
    svd = rows[0]
    for r in rows:
        r["speedup_vs_svd"] = svd["seconds"] / r["seconds"]
        r["excess_residual"] = r["residual"] / svd["residual"] - 1.0
    target = next((r["speedup_vs_svd"] for r in rows if r["projection"] == "randomized"), None)
    return {"benchmark": "refresh", "shape": list(shape), "rank": rank, "oversample": oversample,
            "power_iters": power_iters, "spectrum": {"signal_rank": 2 * rank, "decay": decay, "noise": noise},
            "reps": reps, "environment": environment(dev), "rows": rows,
            "target": None if target is None else {"randomized_speedup_vs_svd": target,
                                                          "meets_5x": target >= 5.0},
            "samples": samples}


def refresh_markdown(result: dict) -> str:
    env = result["environment"]
    m, n = result["shape"]
    columns = [("projection", "projection", None), ("side", "side", None), ("rank", "rank", None),
               ("seconds", "refresh s (median)", lambda x: f"{x:.3f}"),
               ("speedup_vs_svd", "speedup vs svd", lambda x: f"{x:.1f}x"),
               ("residual", "residual", lambda x: f"{x:.4f}"),
               ("excess_residual", "excess vs svd", lambda x: f"{x:+.2%}"),
               ("overlap", "overlap with svd", lambda x: f"{x:.4f}"),
               ("max_angle_deg", "max angle deg", lambda x: f"{x:.1f}")]
    sp = result["spectrum"]
    head = (f"Basis refresh of a {m}x{n} gradient at rank {result['rank']} (spectrum (i+1)^-{sp['decay']} over "
            f"{sp['signal_rank']} components + {sp['noise']:.0%} noise), {env['device_name']}, "
            f"{env['torch_threads']} threads, torch {env['torch']}; medians of {result['reps']} interleaved rounds.  "
            f"randomized: oversample {result['oversample']}, power iterations {result['power_iters']}.")
    lines = [head, "", markdown_table(result["rows"], columns)]
    if result["target"]:
        t = result["target"]
        lines += ["", f"Target (randomized >= 5x faster than svd): {t['randomized_speedup_vs_svd']:.1f}x, "
                      f"{'met' if t['meets_5x'] else 'NOT met'}."]
    return "\n".join(lines)
