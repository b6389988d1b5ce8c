"""bayesq-onnx: BayesQ uncertainty-guided post-training weight quantization for ONNX models."""
from .api import Analysis, Result, compress, make_session
from .config import Recipe
from .errors import BayesQError

__all__ = ["compress", "Analysis", "make_session", "Recipe", "Result", "BayesQError"]
__version__ = "0.1.0"
