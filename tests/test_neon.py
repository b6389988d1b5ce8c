"""The AArch64 NEON kernels (custom_ops/src/kernels_neon.cpp) checked on this x86 machine: cross-compiled
with Debian's g++-aarch64-linux-gnu, run under qemu-aarch64 (qemu-user).  onnxruntime cannot run there,
so a small driver (custom_ops/test/kernel_check.cpp) calls the kernel entry points directly on generated
packed weights (bits 1..8, LUT and affine with and without zero points, partial chunks, K % 8 tails,
groups straddling steps, GEMM blocking) and compares with a plain reference built from the unpacked
codes: decode bit for bit, GEMV / GEMM within the fp32 summation bound, column splits byte-identical.
Correctness only: an emulator says nothing about speed.  Skipped, with the reason, when the cross
compiler or qemu is absent."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "custom_ops" / "src"
CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
MISSING = [t for t in (CXX, QEMU) if shutil.which(t) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not found (apt-get install g++-aarch64-linux-gnu qemu-user)")

# the warnings the x86 SIMD files also silence (GCC cannot see that a group's table is always loaded
# before its first use); anything else is an error
FLAGS = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-uninitialized",
         "-Wno-maybe-uninitialized", f"-I{ROOT / 'custom_ops' / 'include'}", f"-I{SRC}"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("neon") / "kernel_check"
    # static: qemu-aarch64 then needs no AArch64 sysroot; -O2 as the library is built (-O3 only
    # lengthens the cross build)
    cmd = [CXX, *FLAGS, "-O2", "-static", str(ROOT / "custom_ops" / "test" / "kernel_check.cpp"),
           str(SRC / "kernels_scalar.cpp"), str(SRC / "kernels_neon.cpp"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _run(driver: Path, *args: str) -> tuple[int, str]:
    r = subprocess.run([QEMU, str(driver), *args], capture_output=True, text=True, timeout=900)
    return r.returncode, r.stdout + r.stderr


def test_neon_kernels_match_the_reference_under_qemu(driver):
    rc, out = _run(driver, "neon")
    m = re.search(r"^neon: (\d+) checks, (\d+) failed$", out, re.M)
    assert rc == 0 and m and m.group(2) == "0", out[-4000:]
    assert int(m.group(1)) >= 2000, out      # every case ran (2544 at the time of writing)


def test_kernel_checks_can_fail(driver):
    """--fault spoils one element of every kernel output before the comparison: each check must
    then fail, so a passing run above means the kernels' outputs passed, not that nothing was compared."""
    rc, out = _run(driver, "--fault", "--bits", "3", "neon")
    m = re.search(r"^neon: (\d+) checks, (\d+) failed$", out, re.M)
    assert rc == 1 and m and int(m.group(1)) > 0 and m.group(1) == m.group(2), out[-4000:]


def test_library_compiles_for_aarch64():
    """ops.cpp's AArch64 path (the hwcap check, kernel choice) compiles: syntax only, against the
    onnxruntime headers the library build uses (skipped when they cannot be found)."""
    r = subprocess.run([sys.executable, str(ROOT / "custom_ops" / "fetch_ort_headers.py")], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"onnxruntime headers unavailable: {r.stderr.strip()[-300:]}")
    cmd = [CXX, *FLAGS, "-fsyntax-only", f"-I{r.stdout.strip()}", str(SRC / "ops.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
