"""Build step for the `bayesq` onnxruntime custom-op library (everything else is in pyproject.toml).

``pip install [-e] .`` runs CMake on ``custom_ops/`` and puts ``libbayesq_ops.so`` into
``bayesq_onnx/runtime/`` (in the source tree for an editable install).  The ORT headers come from
``$BAYESQ_ORT_INCLUDE_DIR`` or are fetched by ``custom_ops/fetch_ort_headers.py``.  Any failure stops
the install with the reason on its last line; ``BAYESQ_BUILD_CUSTOM_OPS=0`` installs without the
library (bayesq ops then run only through ``--target portable`` or the numpy reference).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
LIB = "libbayesq_ops.so"
# built beside it where CMake finds nvcc (custom_ops/CMakeLists.txt): the CUDA kernels, and the ops for
# onnxruntime's CUDA execution provider
CUDA_LIBS = ("libbayesq_cuda.so", "libbayesq_ops_cuda.so")


class CustomOpsError(Exception):
    pass


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # a plain shared library loaded by onnxruntime, not a Python extension module
        return os.path.join(*fullname.split(".")[:-1], LIB)

    # setuptools knows one file per extension; the CUDA libraries, where built, travel with it: into the
    # source tree (editable installs), the wheel's file list, and the editable wheel's output mapping
    def _with_cuda_libs(self, pairs):
        for dst, src in pairs:
            yield dst, src
            if Path(dst).name == LIB:
                for name in CUDA_LIBS:
                    if Path(dst).with_name(name).exists():
                        yield str(Path(dst).with_name(name)), str(Path(src).with_name(name))

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            for built, inplace in list(self._with_cuda_libs([(regular_file, inplace_file)]))[1:]:
                self.copy_file(built, inplace, level=self.verbose)

    def _get_output_mapping(self):
        return self._with_cuda_libs(super()._get_output_mapping())

    def get_outputs(self):
        outs = super().get_outputs()
        return outs if self.inplace else sorted(d for d, _ in self._with_cuda_libs((o, o) for o in outs))

    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / "custom_ops"
        try:
            self._cmake(out, tmp)
        except CustomOpsError as e:
            sys.exit(f"bayesq custom ops: {e} (set BAYESQ_BUILD_CUSTOM_OPS=0 to install without them)")

    def _cmake(self, out: Path, tmp: Path) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise CustomOpsError("cmake not found: install it (apt-get install cmake, or pip install cmake)")
        if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
            raise CustomOpsError("no C++ compiler found (apt-get install g++)")
        cfg = [cmake, "-S", str(ROOT / "custom_ops"), "-B", str(tmp), "-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}", f"-DPython3_EXECUTABLE={sys.executable}"]
        if shutil.which("ninja") and not (tmp / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja"]
        jobs = str(max(1, min(4, os.cpu_count() or 1)))
        for cmd, what in ((cfg, "configure"), ([cmake, "--build", str(tmp), "--parallel", jobs], "compile")):
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                print(r.stdout, file=sys.stderr)
                lines = r.stdout.splitlines()
                ours = [ln for ln in lines if "bayesq custom ops:" in ln]        # our CMake/fetch messages
                errs = [ln for ln in lines if " error" in ln.lower() or ln.lower().startswith("error")]
                why = (ours or errs or ["see the output above"])[-1].strip().replace("bayesq custom ops: ", "")
                raise CustomOpsError(f"CMake {what} step failed: {why}")
        if not out.exists():
            raise CustomOpsError(f"CMake built no {out}")


build = os.environ.get("BAYESQ_BUILD_CUSTOM_OPS", "1") != "0"
setup(ext_modules=[Extension("bayesq_onnx.runtime.bayesq_ops", sources=[])] if build else [],
      cmdclass={"build_ext": CMakeBuild})
