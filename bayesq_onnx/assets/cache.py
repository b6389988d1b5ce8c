"""What every asset builder shares: reproducible files, a cache directory filled atomically, and
one-line errors that name the missing package.  Nothing here downloads."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from bayesq_onnx.errors import BayesQError, require  # noqa: F401 (the assets' import point)
from bayesq_onnx.graph.model_io import write_npz  # noqa: F401

Progress = Callable[[str], None]


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def cache_key(params: Mapping[str, object], *files: Path) -> str:
    """16 hex digits naming one parameter set and the bytes of the source files it was built from."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for f in files:
        h.update(str(f.name).encode() + b"\0")
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:16]


def package_version(dist: str, install: str, what: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise BayesQError(f"the {what} needs the Python package '{dist}' ({install})") from None


def versions(*dists: str) -> dict[str, str]:
    """Installed versions of ``dists`` (the missing ones left out), for manifests."""
    out = {}
    for d in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[d] = importlib.metadata.version(d)
    return out


@contextlib.contextmanager
def staged_directory(final: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Build into a temporary sibling of ``final`` and rename it into place on success, so a cache
    entry is either whole or absent; on failure nothing is left.  ``complete(final)`` says whether
    a concurrent builder already finished the same entry (then its copy is kept)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():          # left half-made by hand: rebuild it
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it 0700; the cache may be shared
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):     # nobody else finished it: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)   # a concurrent call won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
