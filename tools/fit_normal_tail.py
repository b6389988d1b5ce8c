"""The Chebyshev series behind the native codebook E-step's Gaussian tail
(custom_ops/src/codebook.cpp, ``normal_tail``): prints its coefficients as C++.

    python tools/fit_normal_tail.py [--terms 22] [--amax 7]

With ``z = a / sqrt(2)`` and ``t = 2 / (2 + z)``, ``erfc(z) = exp(-z^2) t g(t)``: ``g`` is smooth on
``t`` in ``[2 / (2 + amax / sqrt(2)), 1]`` (1 at ``z = 0``, ``1 / (2 sqrt(pi))`` as ``z`` grows), so a
short Chebyshev series in ``t`` gives it to far below float64's rounding, with one formula for every
``a`` (no branches: the loop vectorizes).  Coefficients from 40-digit values (mpmath), at the
Chebyshev nodes; the last line prints the first coefficient left out, the series' truncation error.
"""
from __future__ import annotations

import argparse

import mpmath as mp


def coefficients(terms: int, amax: float, nodes: int = 80) -> tuple[list, mp.mpf, mp.mpf]:
    mp.mp.dps = 40
    lo, hi = 2 / (2 + mp.mpf(amax) / mp.sqrt(2)), mp.mpf(1)

    def g(t):
        z = 2 / t - 2
        return mp.erfc(z) * mp.exp(z * z) / t

    xs = [mp.cos(mp.pi * (k + mp.mpf(1) / 2) / nodes) for k in range(nodes)]
    vals = [g((hi - lo) / 2 * x + (hi + lo) / 2) for x in xs]
    c = [2 * mp.fsum(v * mp.cos(mp.pi * j * (k + mp.mpf(1) / 2) / nodes) for k, v in enumerate(vals)) / nodes
         for j in range(terms + 1)]
    c[0] /= 2
    return c, lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--terms", type=int, default=22)
    ap.add_argument("--amax", type=float, default=7.0)
    args = ap.parse_args()
    c, lo, hi = coefficients(args.terms, args.amax)
    print(f"constexpr double kTailLo = {mp.nstr(lo, 20)}, kTailHi = {mp.nstr(hi, 20)};")
    print(f"constexpr double kTailCheb[{args.terms}] = {{")
    for j in range(0, args.terms, 3):
        print("    " + ", ".join(mp.nstr(v, 20, min_fixed=0, max_fixed=0) for v in c[j:min(j + 3, args.terms)]) + ",")
    print("};")
    print(f"// first coefficient left out: {mp.nstr(c[args.terms], 3)}")


if __name__ == "__main__":
    main()
