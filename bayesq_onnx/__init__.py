"""bayesq-onnx: BayesQ uncertainty-guided post-training weight quantization for ONNX models."""
from .config import Recipe
from .errors import BayesQError

__all__ = ["compress", "Analysis", "make_session", "Recipe", "Result", "BayesQError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the pipeline (onnx, onnxruntime, scipy) loads on first use, so that the numpy-only parts --
    # formats/, runtime/cuda.py -- import where only numpy and torch are (tools/gpu_check.sh)
    if name in ("Analysis", "Result", "compress", "make_session"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'bayesq_onnx' has no attribute {name!r}")
