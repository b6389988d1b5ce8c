"""Recipes: frozen dataclasses that say *what* to do; they never read data."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1


@dataclass(frozen=True)
class Method:
    """How a method plans and rounds.  The registry below is the only place methods are named."""

    planner: str   # "knapsack" (BayesQ allocation) or "uniform" (one format everywhere)
    grid: str      # "posterior" (expected-loss range search), "minmax", "hqq" (half-quadratic
                   # zero-point fit) or "dynamic" (min/max of each group when GPTQ reaches it)
    rounding: str  # "gptq" (error feedback with X^T X) or "rtn"
    tables: str | None = None   # the loss-table pass (plan/tables.py) this method always uses;
                                # None: Recipe.tables decides (knapsack planner only)
    sequential: bool = False    # Recipe.sequential's default: whichever measured better (README, "Measured")

    def __post_init__(self):
        if self.planner not in ("knapsack", "uniform") or self.rounding not in ("gptq", "rtn") or \
                self.grid not in ("posterior", "minmax", "hqq", "dynamic"):
            raise ValueError(f"unknown planner, grid or rounding in {self}")

    # what the rest of the code asks of a method (nothing compares these names elsewhere)
    @property
    def allocates(self) -> bool:
        """The knapsack spends the budget over the sites (else one uniform format everywhere)."""
        return self.planner == "knapsack"

    @property
    def gptq(self) -> bool:
        """GPTQ's error feedback rounds the sites with an ``X^T X`` (else round to nearest)."""
        return self.rounding == "gptq"


METHODS: dict[str, Method] = {
    "bayesq": Method(planner="knapsack", grid="posterior", rounding="gptq"),
    "rtn": Method(planner="uniform", grid="minmax", rounding="rtn"),
    # the reference algorithm's defaults (IST-DASLab/gptq): dynamic groups, no act_order
    # block by block on the quantized model's activations, as the reference pipeline (opt_sequential)
    "gptq": Method(planner="uniform", grid="dynamic", rounding="gptq", sequential=True),
    # not the reference HQQ: its half-quadratic lp fit under the integer zero points our formats
    # store (the reference's float zero point would cost 16-32 bits per group), with a closed-form
    # scale step instead (quantize/hqq.py); named for that difference
    "hqq-int": Method(planner="uniform", grid="hqq", rounding="rtn"),
    # mixed precision as the field does it (HAWQ-V2/V3 sensitivity: mean Hessian trace of one global
    # loss times the squared quantization error), allocated and rounded as bayesq and gptq are:
    # the same candidates and knapsack, GPTQ's own codes (docs/design.md, "HAWQ baseline")
    "hawq": Method(planner="knapsack", grid="dynamic", rounding="gptq", tables="hawq"),
}


TARGETS = ("ort-cpu", "portable")
# the N:M patterns ``--sparse`` offers by default: half the weights (2:4, and 4:8's freer choice at 7
# pattern bits per 8 weights instead of 6) and a quarter (6:8)
SPARSE_PATTERNS = ((2, 4), (4, 8), (6, 8))
# where the knapsack's loss tables come from (Recipe.tables; "auto" picks one, see table_source)
TABLE_SOURCES = ("auto", "kron", "proxy", "closed_form")
# where GPTQ's factor and error feedback run (quantize/backend.py); "auto": cuda when torch sees a GPU
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class Recipe:
    bits: float                                   # budget: all stored bits / quantized weight
    method: str = "bayesq"
    seed: int = 0
    curvature: str | None = None                  # CURV.npz path (diagonal curvature per initializer)
    tables: str = "auto"                          # TABLE_SOURCES; "auto": closed_form with a curvature file, else kron
    target: str = "ort-cpu"                       # "ort-cpu" (bayesq formats run by our library) | "portable"
    custom_ops: bool = True                       # False: onnxruntime's native formats only
    matmul_bits: tuple[int, ...] = (2, 4, 8)      # MatMulNBits executes 2/4/8 only (docs/design.md, "What the runtimes accept")
    bayesq_bits: tuple[int, ...] = (3, 5, 6)      # affine widths only the bayesq ops run (MatMul, Conv, Gather)
    lut_bits: tuple[int, ...] = (2, 3, 4)         # Lloyd-Max codebooks, one per row (bayesq planner only)
    # one Lloyd-Max codebook per weight, scaled per row (--scaled-codebooks; knapsack planners only): on by
    # default: as good or better on every bench model and budget (docs/design.md, "Scaled codebooks"); ()
    # turns it off
    scaled_lut_bits: tuple[int, ...] = (2, 3, 4)
    conv_bits: tuple[int, ...] = (2, 4, 8)        # blocked DequantizeLinear; 2 bits raises the opset to 25
    gather_bits: tuple[int, ...] = (2, 4, 8)      # GatherBlockQuantized (uint8 data), or bayesq.GatherAffine
    blocks: tuple[int, ...] = (32, 64, 128, 256)  # group sizes offered to every format
    keep_fp32: bool = True                        # fp32 is a candidate too
    min_elements: int = 1024                      # smaller weights are skipped (nothing to gain)
    holdout: float = 0.25                         # calibration share held back for the plan check
    proxy_samples: int = 32                       # samples the task-aware (proxy) tables are measured on
    scale_samples: int = 8                        # at most this many samples for kron's factors (tables.factor_samples)
    batch_size: int = 8                           # onnxruntime batch for calibration passes
    evidence: float = 1e6                         # rows the weights were trained on (activation posterior)
    damping: float = 1e-2                         # Laplace prior precision, relative to mean(h)
    gptq_damp: float = 0.01                       # GPTQ dampening, relative to mean(diag H)
    act_order: bool = False                       # GPTQ columns by decreasing diag(H) (grids then fixed first)
    device: str = "cpu"                           # DEVICES: where GPTQ runs (the bytes may differ across devices)
    accuracy_level: int = 0                       # MatMulNBits: 0 = exact fp32 maths (what the plan check measured)
    synthetic_samples: int = 32                   # samples in the synthetic fallback calibration
    # fnmatch patterns on initializer or consumer node names (graph/sites.py): excluded weights stay
    # as they are; with include patterns, only the weights some pattern matches are quantized
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    pins: tuple[tuple[str, int], ...] = ()        # (pattern, code bits): matching weights take only such formats
    distill: int = 0                              # Adam steps of calibration-only distillation after rounding; 0: off
    # blocks rounded in graph order, each calibrated on the outputs of the blocks already quantized
    # (docs/design.md, "Sequential"); False: every block on the fp32 model's activations; None: the
    # method's default (Method.sequential)
    sequential: bool | None = None
    # N:M sparse candidates (keep, of) for the knapsack (formats/bayesq_sparse.py); () : none
    sparse: tuple[tuple[int, int], ...] = ()
    sparse_bits: tuple[int, ...] = (2, 3, 4)      # affine widths of the sparse formats' survivors

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {sorted(METHODS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose from {list(TARGETS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose from {list(DEVICES)}")
        if self.tables not in TABLE_SOURCES:
            raise ValueError(f"unknown tables {self.tables!r}; choose from {list(TABLE_SOURCES)}")
        if not (self.bits > 0):
            raise ValueError(f"--bits must be positive, got {self.bits}")
        # every format takes these: onnxruntime's packed ops need powers of two >= 16 (formats/base.py),
        # the bayesq ops multiples of 16, blocked DequantizeLinear any size
        if (isinstance(self.blocks, str) or not self.blocks
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 16 and not b & (b - 1)
                           for b in self.blocks)):
            raise ValueError(f"blocks must be powers of two >= 16 (group sizes), got {self.blocks!r}")
        if not 0 < self.gptq_damp < math.inf:   # undampened, a rank-deficient X^T X has no Cholesky factor
            raise ValueError(f"--gptq-damp must be positive and finite, got {self.gptq_damp}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        for what, patterns in (("exclude", self.exclude), ("include", self.include)):
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise ValueError(f"{what} must be a list of non-empty name patterns, got {patterns!r}")
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be true, false or null (the method's default), got {self.sequential!r}")
        if isinstance(self.distill, bool) or not isinstance(self.distill, int) or self.distill < 0:
            raise ValueError(f"distill must be a number of steps >= 0, got {self.distill!r}")
        for pat in self.sparse:
            if (not isinstance(pat, tuple) or len(pat) != 2 or not all(isinstance(v, int) for v in pat)
                    or not 1 <= pat[0] < pat[1] <= 8):
                raise ValueError(f"a sparse pattern is (keep, of) with 1 <= keep < of <= 8, got {pat!r}")
        if not all(isinstance(b, int) and 1 <= b <= 8 for b in self.scaled_lut_bits):
            raise ValueError(f"scaled_lut_bits must be widths 1..8, got {self.scaled_lut_bits!r}")
        if not all(isinstance(b, int) and 1 <= b <= 8 for b in self.sparse_bits):
            raise ValueError(f"sparse_bits must be widths 1..8, got {self.sparse_bits!r}")
        for pin in self.pins:
            if (not isinstance(pin, tuple) or len(pin) != 2 or not isinstance(pin[0], str) or not pin[0]
                    or isinstance(pin[1], bool) or not isinstance(pin[1], int) or pin[1] < 1):
                raise ValueError(f"a pin is (name pattern, code bits >= 1), got {pin!r}")

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    @property
    def rounds_sequentially(self) -> bool:
        """Sequential mode asked for or the method's default, where it changes something: codes
        rounded to nearest (rtn, hqq-int) never read the calibration statistics."""
        on = self.method_spec.sequential if self.sequential is None else self.sequential
        return on and self.method_spec.gptq

    @property
    def table_source(self) -> str:
        if self.method_spec.tables is not None:
            return self.method_spec.tables
        if self.tables != "auto":
            return self.tables
        return "closed_form" if self.curvature else "kron"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"recipe version {version} is not supported (expected {CONFIG_VERSION})")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown recipe fields: {sorted(unknown)}")
        if "bits" not in d:
            raise ValueError("the recipe has no 'bits' (the budget)")
        return cls(**{k: _tuples(v) for k, v in d.items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """A recipe saved as JSON: ``to_dict()``'s form, or a compress report (which holds the recipe it
        used under ``"recipe"``).  Bad files raise ``BayesQError`` naming the file."""
        from .errors import BayesQError
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise BayesQError(f"recipe file not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BayesQError(f"cannot read recipe file {path}: {e}") from None
        if isinstance(d, dict) and isinstance(d.get("recipe"), dict):
            d = d["recipe"]
        if not isinstance(d, dict):
            raise BayesQError(f"recipe file {path} holds no recipe (a JSON object of recipe fields, or a report)")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise BayesQError(f"recipe file {path}: {e}") from None


def _tuples(v):
    """JSON lists back to the tuples a frozen recipe holds (pins are lists of pairs)."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


SAMPLING_MODES = ("vpq", "jq", "spq")   # lower/sampling.py


@dataclass(frozen=True)
class KeepPosterior:
    """``compress --keep-posterior``: the Laplace posterior kept in the output (docs/design.md,
    "Keeping the posterior"); the recipe's ``bits`` then budgets means and standard deviations together."""

    mode: str = "vpq"             # vpq: draw at run time; jq: draw, then round the draw; spq: stored sets
    sets: int = 8                 # spq: weight sets stored
    seed: int = 0                 # run-time draws, SPQ sets and the prior tuning's draws
    tune_samples: int = 8         # weight samples per prior precision tried on the held-back data
    prior: float | None = None    # a fixed prior precision instead of tuning it (needs no labels)

    def __post_init__(self):
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {self.mode!r}; choose from {', '.join(SAMPLING_MODES)}")
        if self.sets < 1 or self.tune_samples < 1:
            raise ValueError(f"sets and tune_samples must be >= 1, got {self.sets}, {self.tune_samples}")
        if self.prior is not None and not (self.prior > 0 and self.prior < float("inf")):
            raise ValueError(f"the prior precision must be a positive number, got {self.prior}")
