"""Data passed between stages (no logic beyond layout bookkeeping)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class SiteKind(str, Enum):
    """Which ops read a weight.  Every stage that treats kinds differently (statistics, candidate
    formats, lowering) asks one of the properties below, so what a kind means is said here once."""

    MATMUL = "matmul"   # the weight operand of MatMul / Gemm (perhaps through a Transpose)
    CONV = "conv"       # a Conv kernel
    GATHER = "gather"   # an embedding table, rows looked up by index
    TIED = "tied"       # an embedding table that is also the output head's MatMul weight

    def __str__(self) -> str:
        return self.value

    @property
    def multiplied(self) -> bool:
        """A MatMul reads it: its input's ``X^T X`` is the curvature, GPTQ can round it."""
        return self in (SiteKind.MATMUL, SiteKind.TIED)

    @property
    def looked_up(self) -> bool:
        """A Gather reads rows of it: per-row index counts are its curvature."""
        return self in (SiteKind.GATHER, SiteKind.TIED)

    @property
    def only_looked_up(self) -> bool:
        """Only a Gather reads it (an untied embedding): only lookup counts measure its rows."""
        return self is SiteKind.GATHER

    @property
    def convolved(self) -> bool:
        return self is SiteKind.CONV


@dataclass(frozen=True)
class WeightSite:
    """One quantizable initializer and how its consumers see it.

    Numerics work on the *view* ``init.transpose(perm).reshape(rows, L)``: rows are independent
    outputs, ``L`` is the reduction axis that quantization groups run along.
    """

    name: str                       # initializer name
    kind: SiteKind                  # which ops read it (a plain name is taken too)
    op_type: str                    # consumer op, for reports
    shape: tuple[int, ...]          # initializer shape
    perm: tuple[int, ...]
    rows: int
    L: int
    consumers: tuple[str, ...]      # names of the consuming nodes
    activations: tuple[str, ...]    # tensors whose statistics give this site's curvature
    dtype: str = "float32"          # the initializer's and its consumers' float type: float32, float16, bfloat16
    subgraph: str = ""              # op types (If, Loop, Scan) holding consumers read from a subgraph; "" none
    unseen: tuple[str, ...] = ()    # consumers whose input is computed inside a subgraph: no statistics from them

    def __post_init__(self):
        object.__setattr__(self, "kind", SiteKind(self.kind))

    @property
    def flat(self) -> bool:
        """The view is a plain reshape whose ``L`` spans several native axes (``perm`` the identity):
        a Conv with few input channels per group (depthwise), one row per output channel."""
        return self.L != self.shape[self.perm[-1]]

    @property
    def size(self) -> int:
        return self.rows * self.L

    def to_view(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr.transpose(self.perm).reshape(self.rows, self.L))

    def from_view(self, view: np.ndarray) -> np.ndarray:
        permuted = tuple(self.shape[p] for p in self.perm)
        return np.ascontiguousarray(view.reshape(permuted).transpose(np.argsort(self.perm)))


@dataclass(frozen=True)
class SkippedSite:
    name: str
    reason: str


@dataclass
class SiteStats:
    """Forward statistics of one site's inputs over the calibration set."""

    xtx: np.ndarray | None = None   # (L, L) float64 sum of x x^T over all rows seen (matmul; conv: channels over positions)
    n_xtx: int = 0                  # rows of X in xtx
    sq: np.ndarray | None = None    # broadcastable to the view: grouped conv (rows, L) sums of x^2, gather (rows, 1) index counts
    n_sq: int = 0                   # samples (conv) or indices (gather) in sq
