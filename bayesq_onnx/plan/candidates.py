"""Which stored formats each kind of site may take."""
from __future__ import annotations

from ..config import Recipe
from ..errors import BayesQError
from ..formats import BayesqLut, BayesqScaledLut, BayesqSparse, BayesqUniform, BlockedDequantize, Float32, Format, GatherBlockQuantized, MatMulNBits
from ..graph.sites import site_matches
from ..types import WeightSite


# bayesq ops read float16 scales and levels whatever the activations' type: half the bits of
# float32 at a relative rounding of 2^-11, far below any quantization step
F16 = "float16"


def candidate_formats(site: WeightSite, recipe: Recipe, bayesq_ops: bool = True) -> list[Format]:
    """Uniform formats over ``recipe.blocks`` whose groups fit the reduction axis, plus fp32.
    A block longer than the axis only pads, so the largest block kept is the first >= L.
    ``bayesq_ops``: offer the formats only the bayesq custom ops (or the portable lowering) run:
    other affine widths, and (for the knapsack) one Lloyd-Max codebook per row and the N:M sparse
    formats of ``recipe.sparse`` (MatMul and Conv only); embeddings (and tied
    embedding/head tables) then take the bayesq formats instead of GatherBlockQuantized.
    A site that a pin of ``recipe.pins`` names (the first that does) keeps only the formats with the
    pin's code bits (32: fp32; 16: a float16 / bfloat16 weight kept as it is)."""
    blocks = sorted(b for b in recipe.blocks)
    fitting = [b for b in blocks if b <= site.L] or blocks[:1]
    ours = list(recipe.bayesq_bits) if bayesq_ops else []
    knapsack = bayesq_ops and recipe.method_spec.allocates
    luts = list(recipe.lut_bits) if knapsack else []
    scaled = list(recipe.scaled_lut_bits) if knapsack else []
    out: list[Format] = []
    # onnxruntime's ops take scales in the activations' type (float16 in a float16 model); in a
    # bfloat16 one, which its CPU kernels do not compute in, fp32 scales and a Cast (lower/ort_cpu.py)
    sd = "float16" if site.dtype == "float16" else "float32"
    kind = site.kind
    if kind.looked_up and bayesq_ops:
        # bayesq.GatherAffine / GatherLut read the MatMul ops' layout: any width (3 bits included, which
        # GatherBlockQuantized lacks), any row length, fp16 scales, and one table for a tied head
        widths = sorted(set(ours) | set(recipe.gather_bits))
        out += [BayesqUniform(b, g, F16) for b in widths for g in fitting if g % 16 == 0]
        out += _codebooks(luts, scaled)
    elif kind.looked_up:
        # a tied table: one packed table serves the Gather and (reshaped) the head's MatMulNBits, whose
        # layouts coincide byte for byte only when no group is padded
        out += [f for f in (GatherBlockQuantized(b, g, sd) for b in recipe.gather_bits for g in fitting)
                if f.supports(site.rows, site.L) and (not kind.multiplied or site.L % f.block == 0)]
    elif kind.multiplied:
        if bayesq_ops:
            # the same widths with fp16 scales store fewer bits than MatMulNBits (whose scales take
            # the activations' fp32), and our kernels are fast at 2 and 8 bits where onnxruntime's
            # exact (accuracy level 0) kernels are not (docs/design.md, "What the runtimes accept")
            ours = sorted(set(ours) | set(recipe.matmul_bits))
        else:
            out += [MatMulNBits(b, g, sd) for b in recipe.matmul_bits for g in fitting]
        out += [BayesqUniform(b, g, F16) for b in ours for g in fitting if g % 16 == 0]
        out += _codebooks(luts, scaled)
        out += _sparse(site, recipe, fitting) if knapsack else []
    elif kind.convolved:
        conv_blocks = sorted({g for g in (16, *blocks) if g <= site.L})
        # a depthwise Conv's row is one output channel's taps (site.flat): a group per channel too
        dq_blocks = sorted({*conv_blocks, site.L}) if site.flat else conv_blocks
        bq_blocks = [g for g in conv_blocks if g % 16 == 0] or ([-(-site.L // 16) * 16] if site.flat else [])
        out += [BlockedDequantize(b, g, signed=False, scale_dtype=sd) for b in recipe.conv_bits for g in dq_blocks]
        out += [BayesqUniform(b, g, F16) for b in ours for g in bq_blocks]
        out += _codebooks(luts, scaled)
        out += _sparse(site, recipe, conv_blocks) if knapsack else []
    pin = next(((p, b) for p, b in recipe.pins if site_matches(site, p)), None)
    if pin is not None:
        # a pin fixes a weight's precision: pruning a share of it is not that precision
        offered = [f for f in out if not isinstance(f, BayesqSparse)] + [Float32.keep(site.dtype)]
        out = [f for f in offered if f.bits == pin[1]]
        if not out:
            have = ", ".join(str(b) for b in sorted({f.bits for f in offered}))
            raise BayesQError(f"--pin '{pin[0]}={pin[1]}': no format for {site.name} ({site.op_type}) has "
                              f"{pin[1]} code bits; it can take {have}")
        return out
    if recipe.keep_fp32 or not out:
        out.append(Float32.keep(site.dtype))
    return out


def _sparse(site: WeightSite, recipe: Recipe, blocks) -> list[Format]:
    """``recipe.sparse``'s N:M patterns at ``recipe.sparse_bits`` over ``blocks``, where they fit the
    reduction axis (a multiple of the run length; groups whose survivors fill the layout's 16 lanes)."""
    out = []
    for keep, of in recipe.sparse:
        for b in recipe.sparse_bits:
            for g in blocks:
                if site.L % of == 0 and g % of == 0 and (g * keep // of) % 16 == 0:
                    out.append(BayesqSparse(keep, of, b, g, F16))
    return out


def _codebooks(bits, scaled) -> list[Format]:
    """One Lloyd-Max codebook per row (``bits``), and one per weight scaled per row (``scaled``: the
    levels once and an fp16 scale per row), levels and scales in fp16."""
    return [BayesqLut(b, 0, F16) for b in bits] + [BayesqScaledLut(b, 0) for b in scaled]
