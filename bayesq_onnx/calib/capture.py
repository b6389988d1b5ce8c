"""Forward-only activation statistics per site, accumulated batch by batch in bounded memory."""
from __future__ import annotations

import numpy as np

from ..progress import Progress
from ..types import SiteStats, WeightSite


class StatsAccumulator:
    """``X^T X`` over every row entering a matmul site (the GPTQ / K-FAC input factor) and over every
    position of a conv site's input channels, index counts for gather sites (tied sites get both),
    accumulated batch by batch from whichever activations come in (:meth:`add`).  Sites that read
    the same input (q, k and v; gate and up) share one ``X^T X`` array: computed once, held once,
    and freed when the last of them has taken its statistics (:meth:`take`)."""

    def __init__(self, sites: list[WeightSite]):
        self._stats = {s.name: SiteStats() for s in sites}
        self._grams: dict[tuple[str, str], list] = {}       # (input, layout) -> [sum of x x^T, rows]
        self._uses: dict[str, list[tuple[str, str]]] = {s.name: [] for s in sites}
        self._readers = {}                                    # activation -> sites reading it
        for s in sites:
            for a in s.activations:
                self._readers.setdefault(a, []).append(s)

    def add(self, outputs: dict[str, np.ndarray], grams: bool = True) -> None:
        """One batch of activations (any subset of the sites' inputs); ``grams=False``: the batch adds
        to no ``X^T X``, only to the other statistics."""
        for a, x in outputs.items():
            done = set()
            for s in self._readers.get(a, ()):
                layout = _gram_layout(s, x)
                if layout is None:
                    _accumulate(s, self._stats[s.name], x)
                    continue
                if not grams:
                    continue
                if (a, layout) not in self._uses[s.name]:
                    self._uses[s.name].append((a, layout))
                if layout not in done:
                    _gram(self._grams.setdefault((a, layout), [None, 0]), x, layout, s.L)
                    done.add(layout)

    def holds(self, xtx: np.ndarray) -> bool:
        """Whether a site still to be taken shares this ``X^T X``."""
        return any(g[0] is xtx for g in self._grams.values())

    def take(self, site: WeightSite) -> SiteStats:
        """The site's statistics, complete once every batch of its inputs has been added; a Gram no
        other site still needs is released here."""
        st = self._stats.pop(site.name)
        keys = self._uses.pop(site.name)
        if keys:
            parts = [self._grams[k] for k in keys]
            st.xtx = parts[0][0] if len(parts) == 1 else sum(g for g, _ in parts)
            st.n_xtx = sum(r for _, r in parts)
        for k in keys:
            if not any(k in u for u in self._uses.values()):
                del self._grams[k]
        return st


def capture_stats(probe, sites: list[WeightSite], data: dict[str, np.ndarray], batch_size: int) -> dict[str, SiteStats]:
    """Every site's statistics from one pass of ``data`` through the whole model."""
    acts = list(dict.fromkeys(a for s in sites for a in s.activations))
    acc = StatsAccumulator(sites)
    n = len(next(iter(data.values())))
    with Progress("calibration", n) as p:
        for out in probe.run(data, batch_size, outputs=acts):
            acc.add(out)
            p.step(len(out[acts[0]]) if acts else batch_size)
    return {s.name: acc.take(s) for s in sites}


def _gram_layout(site: WeightSite, x: np.ndarray) -> str | None:
    """How a site's use of input ``x`` feeds an ``X^T X``: "rows" (matmul), "channels" (conv), or
    None (grouped conv, gather: other statistics)."""
    if site.kind.multiplied and x.dtype.kind not in "iu":   # (a tied table's Gather reads indices)
        return "rows"
    if site.kind.convolved and x.shape[1] == site.shape[1] == site.L:
        # every weight w[o, i, r, s] meets channel i at (almost) every position, shifted by its tap
        # (r, s): the channel Gram over positions is each tap's X^T X (exact for 1x1 convolutions;
        # for k x k it leaves out padding and the correlation between taps, see docs/design.md)
        return "channels"
    return None


# rows of one float32 product: BLAS sums each entry over them in float32, then the total is float64
_GRAM_ROWS = 4096


def _gram(acc: list, x: np.ndarray, layout: str, L: int) -> None:
    """``X^T X`` of a batch added to ``acc`` ([float64 Gram or None, rows]).  Each product is float32
    over at most :data:`_GRAM_ROWS` rows: its relative error, about 5e-7 measured on 512-1536 rows
    of 768-5632 inputs, is far below GPTQ's damping (1% of the mean diagonal) and the batches'
    own sampling noise; the float64 product took 1.3-2x as long (one thread) and needed a
    float64 copy of the batch and of the product (a 5632-wide input: 254 MB)."""
    x = (np.moveaxis(x, 1, -1) if layout == "channels" else x).reshape(-1, L).astype(np.float32, copy=False)
    for r in range(0, x.shape[0], _GRAM_ROWS):
        part = x[r:r + _GRAM_ROWS]
        g = part.T @ part
        if acc[0] is None:
            acc[0] = g.astype(np.float64)
        else:   # in place: a 5632-wide input's Gram is 254 MB (1B Llama's down projection)
            acc[0] += g
    acc[1] += x.shape[0]


def _accumulate(site: WeightSite, st: SiteStats, x: np.ndarray) -> None:
    if site.kind.convolved:  # grouped: w[o, i, ...] meets input channel (o // (O / g)) * (I / g) + i alone
        e = np.square(x, dtype=np.float64).sum(axis=(0,) + tuple(range(2, x.ndim)))
        O, per = site.shape[0], site.shape[1]
        ch = np.arange(O)[:, None] // (O // (x.shape[1] // per)) * per + np.arange(per)
        sq = site.to_view(np.broadcast_to(e[ch].reshape(O, per, *[1] * (len(site.shape) - 2)), site.shape))
        st.sq = sq if st.sq is None else st.sq + sq
        st.n_sq += x.size // x.shape[1]
    elif site.kind.looked_up:   # (a tied table's head input has gone to _gram)
        counts = np.bincount(x.reshape(-1).astype(np.int64) % site.rows, minlength=site.rows)
        counts = counts.astype(np.float64).reshape(site.rows, 1)
        st.sq = counts if st.sq is None else st.sq + counts
        st.n_sq += x.size
    else:
        raise ValueError(f"unknown site kind {site.kind!r}")
