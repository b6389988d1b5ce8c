"""Forward-only activation statistics per site, accumulated batch by batch in bounded memory."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..progress import Progress
from ..types import SiteStats, WeightSite


def capture_stats(probe, sites: list[WeightSite], data: dict[str, np.ndarray], batch_size: int) -> dict[str, SiteStats]:
    """``X^T X`` over every row entering a matmul site (the GPTQ / K-FAC input factor) and over every
    position of a conv site's input channels, index counts for gather sites (tied sites get both)."""
    acts = list(dict.fromkeys(a for s in sites for a in s.activations))
    stats = {s.name: SiteStats() for s in sites}
    n = len(next(iter(data.values())))
    with Progress("calibration", n) as p:
        for out in probe.run(data, batch_size, outputs=acts):
            for s in sites:
                st = stats[s.name]
                for a in s.activations:
                    _accumulate(s, st, out[a])
            p.step(len(out[acts[0]]) if acts else batch_size)
    return stats


def _accumulate(site: WeightSite, st: SiteStats, x: np.ndarray) -> None:
    if site.kind == "tied":  # both uses: index counts from the Gather, X^T X from the head
        _accumulate(replace(site, kind="gather" if x.dtype.kind in "iu" else "matmul"), st, x)
    elif site.kind == "matmul":
        x = x.reshape(-1, site.L).astype(np.float64)
        st.xtx = (x.T @ x) if st.xtx is None else st.xtx + x.T @ x
        st.n_xtx += x.shape[0]
    elif site.kind == "conv" and x.shape[1] == site.shape[1] == site.L:
        # every weight w[o, i, r, s] meets channel i at (almost) every position, shifted by its tap
        # (r, s): the channel Gram over positions is each tap's X^T X (exact for 1x1 convolutions;
        # for k x k it leaves out padding and the correlation between taps, see docs/design.md)
        x = np.moveaxis(x, 1, -1).reshape(-1, site.L).astype(np.float64)
        st.xtx = (x.T @ x) if st.xtx is None else st.xtx + x.T @ x
        st.n_xtx += x.shape[0]
    elif site.kind == "conv":  # grouped: w[o, i, ...] meets input channel (o // (O / g)) * (I / g) + i alone
        e = np.square(x, dtype=np.float64).sum(axis=(0,) + tuple(range(2, x.ndim)))
        O, per = site.shape[0], site.shape[1]
        ch = np.arange(O)[:, None] // (O // (x.shape[1] // per)) * per + np.arange(per)
        sq = site.to_view(np.broadcast_to(e[ch].reshape(O, per, *[1] * (len(site.shape) - 2)), site.shape))
        st.sq = sq if st.sq is None else st.sq + sq
        st.n_sq += x.size // x.shape[1]
    elif site.kind == "gather":
        counts = np.bincount(x.reshape(-1).astype(np.int64) % site.rows, minlength=site.rows)
        counts = counts.astype(np.float64).reshape(site.rows, 1)
        st.sq = counts if st.sq is None else st.sq + counts
        st.n_sq += x.size
    else:
        raise ValueError(f"unknown site kind {site.kind!r}")
