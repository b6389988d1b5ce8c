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
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BayesQError, first_line, require
from .graph.model_io import rename_initializers
from .graph.sites import _subgraph_names

log = logging.getLogger(__name__)
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
           opset: int | None = 17, exporter: str = "torchscript", readable_names: bool = False,
           **export_kwargs) -> dict[str, ParamLocation]:
    """``torch.onnx.export`` to ``path``, written atomically, and the map of every named parameter (tied
    ones under each name).  ``exporter``: ``torchscript`` (``dynamo=False``, constant folding on),
    ``dynamo``, or ``auto`` (dynamo, and TorchScript where dynamo fails: it needs the ``onnxscript``
    package and does not trace every module).  ``readable_names``: initializers the exporter named
    ``onnx::...`` that hold one parameter are renamed after it (``fc.weight``, or ``fc.weight_T`` for a
    transposed copy), so that reports and ``--exclude`` / ``--pin`` patterns can use torch's names."""
    import onnx

    from .graph.model_io import constants_to_initializers, save_model_atomic

    path = Path(path)
    args = args if isinstance(args, tuple) else (args,)
    params = list(module.named_parameters(remove_duplicate=False))
    if not params:
        raise BayesQError("the module has no parameters to map")
    used = _used_parameters(module, args, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    if exporter not in EXPORTERS:
        raise BayesQError(f"unknown exporter {exporter!r}; choose from {list(EXPORTERS)}")
    tries = ("dynamo", "torchscript") if exporter == "auto" else (exporter,)
    try:
        for i, how in enumerate(tries):
            try:
                _torch_export(module, args, tmp, how, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset=opset, **export_kwargs)
                model = onnx.load(tmp)
                constants_to_initializers(model)   # the names compress sees (model_io.load_model does the same)
                read = {n for node in model.graph.node for n in node.input}
                inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in read}
                pmap = map_parameters(params, inits, used)   # an export that cannot be mapped is not kept
                break
            except Exception as e:
                if i == len(tries) - 1:
                    raise
                # dynamo needs onnxscript, does not trace every module, and may fold parameters away
                log.info("the %s exporter did not do (%s); using %s", how, first_line(e), tries[i + 1])
        if readable_names:
            pmap = _rename_initializers(model, pmap)
            save_model_atomic(model, path)
            os.unlink(tmp)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 is not what a new file gets
            os.replace(tmp, path)
        log.info("exported with the %s exporter", how)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, BayesQError):
            raise BayesQError(f"torch.onnx.export failed: {first_line(e)}") from None
        raise
    return pmap


EXPORTERS = ("auto", "dynamo", "torchscript")


def _torch_export(module, args, tmp: str, how: str, opset: int | None, **kw) -> None:
    """One ``torch.onnx.export`` call, ``how`` = ``dynamo`` or ``torchscript``, quietly: tracer warnings
    and the dynamo exporter's progress prints and logs are not the user's to act on.  ``opset``
    None: 17 for TorchScript, 18 for dynamo (the lowest it implements)."""
    import contextlib
    import io

    import torch

    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            if how == "dynamo":
                torch.onnx.export(module, args, tmp, dynamo=True, external_data=False, verbose=False,
                                  opset_version=opset or 18, **kw)
            else:
                torch.onnx.export(module, args, tmp, dynamo=False, opset_version=opset or 17, **kw)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _rename_initializers(model, pmap: dict[str, ParamLocation]) -> dict[str, ParamLocation]:
    """Give ``onnx::``-named initializers that hold exactly one parameter its name (``_T``: transposed),
    in ``model`` (top-level graph) and in the map."""
    holders: dict[str, set[tuple[str, str]]] = {}
    for loc in pmap.values():
        for u in loc.uses:
            holders.setdefault(u.initializer, set()).add((loc.tensor, u.layout))
    taken = {t.name for t in model.graph.initializer} | {v for n in model.graph.node for v in (*n.input, *n.output)}
    taken |= {v.name for v in (*model.graph.input, *model.graph.output)}
    nested = _subgraph_names(model)   # read by name inside If/Loop bodies: left as they are
    renames = {}
    for old, owners in holders.items():
        if not old.startswith("onnx::") or len(owners) != 1 or old in nested:
            continue
        (tensor, layout), = owners
        new = tensor + ("_T" if layout == "transpose" else "")
        if new not in taken:
            renames[old] = new
            taken.add(new)
    rename_initializers(model, renames)
    return {k: ParamLocation(tuple(InitializerUse(renames.get(u.initializer, u.initializer), u.layout)
                                   for u in loc.uses), loc.tensor, loc.shape)
            for k, loc in pmap.items()}


def parameter_map_json(pmap: dict[str, ParamLocation]) -> dict:
    """The map as plain JSON: parameter -> its tensor's first name, shape, and initializers with layout."""
    return {name: {"tensor": loc.tensor, "shape": list(loc.shape),
                   "initializers": [{"name": u.initializer, "layout": u.layout} for u in loc.uses]}
            for name, loc in pmap.items()}


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


# ----------------------------------------------------------------------------- the export command

DTYPES = ("float32", "float16", "int64", "int32", "bool")


@dataclass(frozen=True)
class ExampleInput:
    """One input of the example call a module is traced with (axis 0 is exported as dynamic)."""
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class ExportResult:
    pmap: dict[str, ParamLocation]
    source: str                      # "module" or "transformers"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_abs_error: float             # onnxruntime against torch on the example inputs


def export_source(source: str, path: str | os.PathLike, *, inputs: tuple[ExampleInput, ...] = (),
                  output_names: tuple[str, ...] = (), seq_len: int = 16, batch: int = 2,
                  exporter: str = "auto", opset: int | None = None, seed: int = 0) -> ExportResult:
    """What ``bayesq-onnx export`` does: ``source`` is ``file.py:factory`` (``factory()`` returns a
    ``torch.nn.Module``, traced with ``inputs``) or a transformers model directory (``config.json``
    and weights, loaded offline; inputs ``input_ids`` and ``attention_mask`` of ``batch`` x ``seq_len``,
    output ``logits``).  Axis 0 of every input and output is dynamic (and the sequence axis of a
    transformers model).  The model goes to ``path`` with readable initializer names; onnxruntime's
    result on the example inputs is compared with torch's."""
    torch = require("torch", "pip install torch", "export command")
    if Path(source).is_dir():
        module, args, names, out_names, dyn = _transformers_source(Path(source), seq_len, batch, seed)
    else:
        module = _module_source(source)
        if not inputs:
            raise BayesQError("exporting a module needs its example inputs: --input NAME:SHAPE[:DTYPE] "
                              "(e.g. --input x:1x64)")
        gen = torch.Generator().manual_seed(seed)
        args = tuple(_example_tensor(torch, i, gen) for i in inputs)
        names = tuple(i.name for i in inputs)
        dyn = {n: {0: "batch"} for n in names}
        out_names = tuple(output_names)
    with torch.no_grad():
        try:
            expected = [t.detach().float().numpy() for t in _flatten(module(*args))]
        except Exception as e:
            raise BayesQError(f"the model fails on the example inputs: {first_line(e)}") from None
    if not expected:
        raise BayesQError("the model returns no tensors")
    if not out_names:
        out_names = ("output",) if len(expected) == 1 else tuple(f"output_{i}" for i in range(len(expected)))
    elif len(out_names) != len(expected):
        raise BayesQError(f"{len(out_names)} output names given, the model returns {len(expected)} tensors")
    for o in out_names:
        dyn.setdefault(o, {0: "batch"})
    pmap = export(module, args, path, input_names=list(names), output_names=list(out_names), dynamic_axes=dyn,
                  opset=opset, exporter=exporter, readable_names=True)
    err = _check_with_onnxruntime(path, names, args, expected)
    return ExportResult(pmap, "transformers" if Path(source).is_dir() else "module", names, tuple(out_names), err)


def _example_tensor(torch, spec: ExampleInput, gen):
    if spec.dtype not in DTYPES:
        raise BayesQError(f"input {spec.name!r}: dtype {spec.dtype!r} is not one of {', '.join(DTYPES)}")
    dtype = getattr(torch, spec.dtype)
    if spec.dtype.startswith("float"):
        return torch.randn(spec.shape, generator=gen).to(dtype)
    if spec.dtype == "bool":
        return torch.ones(spec.shape, dtype=dtype)
    return torch.zeros(spec.shape, dtype=dtype)   # valid indices for any embedding


def _module_source(source: str):
    """``file.py:factory`` -> ``factory()``, in eval mode.  The file is imported under a private name
    with its own directory on ``sys.path`` (for the helpers beside it)."""
    import importlib.util
    import sys

    import torch

    file, sep, factory = source.rpartition(":")
    if not sep or not file or not factory.isidentifier():
        raise BayesQError(f"export source {source!r} is neither FILE.py:FACTORY nor a transformers model directory")
    path = Path(file)
    if not path.is_file():
        raise BayesQError(f"module file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_bayesq_export_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise BayesQError(f"cannot import {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(mod)
        fn = getattr(mod, factory, None)
        if not callable(fn):
            raise BayesQError(f"{path} has no function {factory!r}")
        module = fn()
    except BayesQError:
        raise
    except Exception as e:
        raise BayesQError(f"{source}: {type(e).__name__}: {first_line(e)}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not isinstance(module, torch.nn.Module):
        raise BayesQError(f"{source} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def _transformers_source(directory: Path, seq_len: int, batch: int, seed: int):
    """A transformers model directory -> (module returning logits, example args, names, dynamic axes).
    The architecture is the one ``config.json`` names; nothing is fetched from a hub."""
    import torch

    transformers = require("transformers", "pip install transformers", "export of a transformers model")
    transformers.logging.set_verbosity_error()       # its notes and progress bars are not the user's to act on
    transformers.logging.disable_progress_bar()
    if not (directory / "config.json").is_file():
        raise BayesQError(f"{directory} is not a transformers model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise BayesQError(f"cannot read {directory / 'config.json'}: {first_line(e)}") from None
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise BayesQError(f"{directory / 'config.json'} names no architecture this transformers version knows "
                          f"({archs or 'none given'})")
    try:
        model = cls.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise BayesQError(f"cannot load {archs[0]} from {directory}: {first_line(e)}") from None
    model.config.use_cache = False   # no past key/values among the outputs

    class Logits(cls):
        """The model with ``logits`` as its only output (same parameters, same names)."""

        def forward(self, input_ids, attention_mask):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask)
            logits = getattr(out, "logits", None)
            if logits is None:
                raise BayesQError(f"{archs[0]} returns no logits: export a module that does (FILE.py:FACTORY)")
            return logits

    model.__class__ = Logits
    model = model.float().eval()
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    args = (ids, torch.ones(batch, seq_len, dtype=torch.int64))
    names = ("input_ids", "attention_mask")
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    with torch.no_grad():
        logits = model(*args)
    dyn["logits"] = {0: "batch", 1: "sequence"} if logits.dim() == 3 else {0: "batch"}
    return model, args, names, ("logits",), dyn


def _check_with_onnxruntime(path, names, args, expected) -> float:
    """Max abs difference of onnxruntime's outputs from torch's on the example inputs."""
    from .runtime.session import make_session

    try:
        sess = make_session(str(path))
        got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    except Exception as e:
        raise BayesQError(f"onnxruntime cannot run the exported model: {first_line(e)}") from None
    return max(float(np.max(np.abs(np.asarray(g, np.float32) - e), initial=0.0)) for g, e in zip(got, expected))
