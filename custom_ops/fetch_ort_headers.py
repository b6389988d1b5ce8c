#!/usr/bin/env python3
"""Find or fetch the onnxruntime C/C++ API headers the custom-op library is compiled against.

The onnxruntime wheel ships no headers.  Debian's ``libonnxruntime-dev`` (trixie: ORT 1.21,
``ORT_API_VERSION`` 21) has them, and a library built against API 21 loads in any later
onnxruntime (the C API is append-only).  This script prints the include directory (the one
holding ``onnxruntime_c_api.h``) on stdout, trying in order:

1. ``$BAYESQ_ORT_INCLUDE_DIR`` (headers you already have; nothing is fetched);
2. a previous fetch in the cache (``$BAYESQ_ORT_HEADERS_CACHE``, default
   ``$XDG_CACHE_HOME/bayesq-onnx/ort-headers`` or ``~/.cache/bayesq-onnx/ort-headers``);
3. ``apt-get download libonnxruntime-dev`` from Debian trixie with a private apt configuration
   (its own sources list, lists and cache directories in a temporary directory; the machine's
   apt setup is neither read for sources nor changed), then ``dpkg-deb -x`` into the cache.

On failure it prints one line saying exactly what is missing to stderr and exits 1.
Standard library only: it runs inside pip's isolated build environment.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER = "onnxruntime_c_api.h"
PACKAGE = "libonnxruntime-dev"
SUITE = "trixie"
ARCHIVE = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
NEEDED = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")


class FetchError(Exception):
    pass


def _valid(d: Path) -> bool:
    return all((d / h).is_file() for h in NEEDED)


def cache_dir() -> Path:
    if os.environ.get("BAYESQ_ORT_HEADERS_CACHE"):
        return Path(os.environ["BAYESQ_ORT_HEADERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bayesq-onnx" / "ort-headers"


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = " | ".join(line.strip() for line in r.stdout.strip().splitlines()[-3:])
        raise FetchError(f"{what} failed (exit {r.returncode}): {tail}")


def fetch(dest: Path) -> Path:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FetchError(f"'{tool}' not found: the headers are fetched from Debian's {PACKAGE}; on a "
                             f"non-Debian system set BAYESQ_ORT_INCLUDE_DIR to a directory holding {HEADER}")
    if not os.path.isfile(KEYRING):
        raise FetchError(f"{KEYRING} not found (Debian package debian-archive-keyring): apt cannot verify "
                         f"Debian {SUITE}; install it or set BAYESQ_ORT_INCLUDE_DIR")
    with tempfile.TemporaryDirectory(prefix="bayesq-ort-headers-") as tmp:
        t = Path(tmp)
        for d in ("etc/sources.list.d", "etc/preferences.d", "lists/partial", "cache/archives/partial", "deb"):
            (t / d).mkdir(parents=True)
        (t / "etc/sources.list").write_text("")
        (t / "etc/sources.list.d/trixie.sources").write_text(
            f"Types: deb\nURIs: {ARCHIVE}\nSuites: {SUITE}\nComponents: main\nSigned-By: {KEYRING}\n")
        opts = [f"-oDir::Etc::sourcelist={t}/etc/sources.list", f"-oDir::Etc::sourceparts={t}/etc/sources.list.d",
                f"-oDir::Etc::preferencesparts={t}/etc/preferences.d", f"-oDir::State::Lists={t}/lists",
                f"-oDir::Cache={t}/cache", "-oAPT::Sandbox::User=root", "-qq"]
        _run(["apt-get", *opts, "update"], f"apt-get update (Debian {SUITE} index from {ARCHIVE})")
        r = subprocess.run(["apt-get", *opts, "download", PACKAGE], cwd=t / "deb",
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        debs = glob.glob(str(t / "deb" / f"{PACKAGE}_*.deb"))
        if r.returncode != 0 or not debs:
            tail = " | ".join(line.strip() for line in r.stdout.strip().splitlines()[-3:])
            raise FetchError(f"apt-get download {PACKAGE} from Debian {SUITE} failed (exit {r.returncode}): {tail}")
        x = t / "x"
        _run(["dpkg-deb", "-x", debs[0], str(x)], f"dpkg-deb -x {os.path.basename(debs[0])}")
        inc = x / "usr/include/onnxruntime"
        if not _valid(inc):
            raise FetchError(f"{os.path.basename(debs[0])} holds no usr/include/onnxruntime/{HEADER}")
        # fill a sibling directory, then rename: a concurrent or interrupted build never sees half a copy
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
        shutil.copytree(inc, staging / "include", dirs_exist_ok=True)
        (staging / "SOURCE").write_text(os.path.basename(debs[0]) + "\n")
        try:
            os.rename(staging, dest)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not _valid(dest / "include"):
                raise
    return dest / "include"


def find_headers() -> Path:
    env = os.environ.get("BAYESQ_ORT_INCLUDE_DIR")
    if env:
        d = Path(env)
        if not _valid(d):
            missing = [h for h in NEEDED if not (d / h).is_file()]
            raise FetchError(f"BAYESQ_ORT_INCLUDE_DIR={env} lacks {', '.join(missing)}")
        return d
    dest = cache_dir() / f"{SUITE}-{PACKAGE}"
    if _valid(dest / "include"):
        return dest / "include"
    return fetch(dest)


def main() -> int:
    try:
        print(find_headers())
    except (FetchError, OSError) as e:
        print(f"bayesq custom ops: cannot get the onnxruntime headers: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
