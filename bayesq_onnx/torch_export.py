"""Export a torch module to ONNX and say where each parameter went: parameter name -> the
initializer(s) holding it and how (``identity``, or ``transpose`` for a Linear weight the exporter
stored as a MatMul ``(in, out)`` initializer).

Parameters are found by value after export (exporters rename, fold and copy initializers), among
the initializers the graph reads:
- an initializer named like the parameter that holds its values, plus unclaimed copies (e.g. the
  transposed copy a tied embedding gets for the output head: one parameter, two initializers);
- else the unclaimed initializers holding its values or their transpose;
- else initializers of other parameters with equal values (the exporter merges equal-valued
  initializers: e.g. freshly initialized LayerNorm weights, all ones, become one initializer).
A parameter the exported outputs do not depend on maps to no initializer; one they depend on
that no initializer holds (e.g. a Conv weight fused with BatchNorm) is an error that names it: use
the ONNX-only route (``bayesq-onnx curvature``), which differentiates the stored weights directly.

``map_curvature`` moves torch-side curvature (parameter name -> tensor) into the ``CURV.npz``
contract through the map.  Exact for a parameter stored once; for a parameter stored in several
initializers (tied) each gets the parameter's total curvature (the split per use is not known on
the torch side), and parameters merged into one initializer are summed (cross terms dropped).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BayesQError, first_line

LAYOUTS = ("identity", "transpose")


@dataclass(frozen=True)
class InitializerUse:
    initializer: str
    layout: str      # "identity": initializer == param; "transpose": initializer == param.T (2-D)


@dataclass(frozen=True)
class ParamLocation:
    uses: tuple[InitializerUse, ...]   # empty: the exported outputs do not depend on the parameter
    tensor: str                        # first name of the same torch tensor (tied names share it)
    shape: tuple[int, ...]


def export(module, args, path: str | os.PathLike, *, input_names=None, output_names=None, dynamic_axes=None,
           opset: int = 17, **export_kwargs) -> dict[str, ParamLocation]:
    """``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``, constant folding on) to ``path``,
    written atomically, and the map of every named parameter (tied ones under each name)."""
    import onnx
    import torch

    from .graph.model_io import constants_to_initializers

    path = Path(path)
    args = args if isinstance(args, tuple) else (args,)
    params = list(module.named_parameters(remove_duplicate=False))
    if not params:
        raise BayesQError("the module has no parameters to map")
    used = _used_parameters(module, args, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # TracerWarnings about shapes fixed at export
            torch.onnx.export(module, args, tmp, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, **export_kwargs)
        model = onnx.load(tmp)
        constants_to_initializers(model)   # the names compress sees (graph.model_io.load_model does the same)
        read = {n for node in model.graph.node for n in node.input}
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in read}
        pmap = map_parameters(params, inits, used)   # before the rename: an unmappable export is not kept
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 is not what a new file gets
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, BayesQError):
            raise BayesQError(f"torch.onnx.export failed: {first_line(e)}") from None
        raise
    return pmap


def map_parameters(params, inits: dict[str, np.ndarray], used: set[str] | None = None) -> dict[str, ParamLocation]:
    """The map for ``params`` (``(name, tensor)`` pairs; tied tensors under several names) given the
    exported initializers (name -> array).  ``used``: names the outputs depend on (default: all)."""
    by_value: dict[tuple, list[str]] = {}
    for name, arr in inits.items():
        by_value.setdefault(_key(arr), []).append(name)
    names_of: dict[int, list[str]] = {}
    for name, p in params:
        names_of.setdefault(id(p), []).append(name)
    all_names = {n for n, _ in params}
    out = {}
    for name, p in params:
        own_names = names_of[id(p)]
        if name != own_names[0]:            # a tied alias: the same tensor, the same initializers
            out[name] = out[own_names[0]]
            continue
        value = p.detach().cpu().numpy()
        shape = tuple(value.shape)
        if used is not None and name not in used:
            out[name] = ParamLocation((), name, shape)
            continue
        ident = by_value.get(_key(value), [])
        trans = [t for t in by_value.get(_key(value.T), []) if t not in ident] if value.ndim == 2 else []
        cands = [InitializerUse(i, "identity") for i in ident] + [InitializerUse(i, "transpose") for i in trans]
        own = [c for c in cands if c.initializer in own_names and c.layout == "identity"]
        free = [c for c in cands if c.initializer not in all_names]
        uses = own + free if own else free or cands
        if not uses:
            raise BayesQError(f"parameter {name!r} {shape} is used by the model but no exported initializer holds "
                              "its values (folded into another weight, e.g. Conv+BatchNorm fusion?); compute "
                              "curvature on the ONNX file instead (bayesq-onnx curvature)")
        out[name] = ParamLocation(tuple(uses), name, shape)
    return out


def _key(arr: np.ndarray) -> tuple:
    a = np.ascontiguousarray(arr)
    return (a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).hexdigest())


def _used_parameters(module, args, params) -> set[str]:
    """Names of the parameters the module's float outputs depend on (one forward and backward)."""
    import torch

    tensors = [p for _, p in params]
    with torch.enable_grad():
        try:
            out = module(*args)
        except Exception as e:
            raise BayesQError(f"the module fails on the example inputs: {first_line(e)}") from None
        outs = [t for t in _flatten(out) if t.is_floating_point() and t.requires_grad]
        if not outs:
            return set()
        total = sum(t.float().sum() for t in outs)
        grads = torch.autograd.grad(total, tensors, allow_unused=True)
    return {n for (n, _), g in zip(params, grads) if g is not None}


def _flatten(out):
    import torch
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        for v in out.values():
            yield from _flatten(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _flatten(v)


def map_curvature(curv: dict, pmap: dict[str, ParamLocation]) -> dict[str, np.ndarray]:
    """Torch-side curvature (parameter name -> tensor or array in the parameter's shape, e.g. from
    ``curvature.fisher.fisher_diagonal`` with ``module_forward``) -> ``{initializer: array}`` in the
    initializer's layout, float32, for ``graph.model_io.save_npz_atomic``.  See the module docstring for
    tied and merged parameters."""
    per_init: dict[str, dict[str, np.ndarray]] = {}
    for name, c in curv.items():
        if name not in pmap:
            raise BayesQError(f"curvature given for {name!r}, which is not a parameter of the exported module")
        loc = pmap[name]
        a = np.asarray(c.detach().cpu().numpy() if hasattr(c, "detach") else c, np.float64)
        if a.shape != loc.shape:
            raise BayesQError(f"curvature for {name!r} has shape {a.shape}, the parameter has {loc.shape}")
        if not np.isfinite(a).all() or (a < 0).any():
            raise BayesQError(f"curvature for {name!r} must be finite and >= 0")
        for use in loc.uses:
            view = a.T if use.layout == "transpose" else a
            per_init.setdefault(use.initializer, {})[loc.tensor] = view   # tied names count once
    return {k: np.ascontiguousarray(sum(v.values())).astype(np.float32) for k, v in per_init.items()}


def module_forward(module, input_names: list[str], output: int | str = 0) -> Callable:
    """``forward(params, batch) -> output`` for ``curvature.fisher`` / ``hutchinson`` on a torch
    module: ``batch`` maps input names to arrays (positional arguments in ``input_names`` order);
    ``output`` picks a tuple index or a dict / ModelOutput key of what the module returns."""
    import torch
    from torch.func import functional_call

    def forward(params, batch):
        args = tuple(torch.as_tensor(np.asarray(batch[k])) for k in input_names)
        out = functional_call(module, params, args)
        return out[output] if not isinstance(out, torch.Tensor) else out

    return forward
