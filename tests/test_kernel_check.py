"""The kernel sets this machine runs (scalar; AVX2 and AVX-512 where the CPU has them), called directly by
custom_ops/test/kernel_check.cpp built natively: decode bit for bit, GEMV and GEMM within the fp32
summation bound and byte-identical under column splits, for every row count of the GEMV's row blocks
(M = 1..9), the GEMM's tiles and row blocks (M = 1, 7, 8, 9, 63, 64, 65, 150), GEMV K slices and shapes
whose K and N are not multiples of a chunk, slice or panel.  tests/test_neon.py runs the same driver on
the NEON kernels under qemu; tests/test_custom_ops.py goes through onnxruntime and the GEMV/GEMM switch."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "custom_ops" / "src"
CXX = shutil.which("g++")
X86 = platform.machine() in ("x86_64", "AMD64")

pytestmark = pytest.mark.skipif(not CXX or not X86, reason="needs g++ on x86-64")

FLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-uninitialized",
         "-Wno-maybe-uninitialized", f"-I{ROOT / 'custom_ops' / 'include'}", f"-I{SRC}"]
# the per-file ISA flags of custom_ops/CMakeLists.txt
ISA_FLAGS = {"kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
             "kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


FLAGS_CPU = _cpu_flags()
ISAS = ["scalar"] + (["avx2"] if {"avx2", "fma", "f16c"} <= FLAGS_CPU else []) + (
    ["avx512"] if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= FLAGS_CPU else [])


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kernel_check")
    objs = []
    for name in ("kernel_check.cpp", "kernels_scalar.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp"):
        src = ROOT / "custom_ops" / "test" / name if name == "kernel_check.cpp" else SRC / name
        obj = d / (name + ".o")
        r = subprocess.run([CXX, *FLAGS, *ISA_FLAGS.get(name, []), "-c", str(src), "-o", str(obj)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        objs.append(str(obj))
    out = d / "kernel_check"
    r = subprocess.run([CXX, *objs, str(SRC / "kernels_neon.cpp"), *FLAGS, "-o", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.mark.parametrize("isa", ISAS)
def test_kernels_match_the_reference(driver, isa):
    r = subprocess.run([str(driver), isa], capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    m = re.search(rf"^{isa}: (\d+) checks, (\d+) failed$", out, re.M)
    assert r.returncode == 0 and m and m.group(2) == "0", out[-4000:]
    assert int(m.group(1)) >= 5000, out      # every case ran (7056 at the time of writing)


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_checks_can_fail(driver, isa):
    """--fault spoils one element of every kernel output: every check must then fail."""
    r = subprocess.run([str(driver), "--fault", "--bits", "3", isa], capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    m = re.search(rf"^{isa}: (\d+) checks, (\d+) failed$", out, re.M)
    assert r.returncode == 1 and m and int(m.group(1)) > 0 and m.group(1) == m.group(2), out[-4000:]
