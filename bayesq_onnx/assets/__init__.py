"""Real models and data for benchmarks and tests, generated from installed packages into a cache.

Nothing here downloads: models come from PyPI wheels, text from Debian packages (see docs/design.md, "Real models and data").
Heavy dependencies (torch, transformers) are imported only when an asset has to be built.
"""
import os
from pathlib import Path

from bayesq_onnx.assets.cache import load_npz
from bayesq_onnx.assets.efficientnet import EfficientNetAsset, prepare_efficientnet
from bayesq_onnx.assets.fashion_mnist import FashionMNISTAsset, prepare_fashion_mnist
from bayesq_onnx.assets.minilm import MiniLMAsset, prepare_minilm
from bayesq_onnx.assets.smollm2 import SmolLM2Asset, prepare_smollm2

__all__ = ["EfficientNetAsset", "prepare_efficientnet", "FashionMNISTAsset", "prepare_fashion_mnist", "MiniLMAsset", "SmolLM2Asset", "prepare_smollm2", "default_cache", "load_npz", "prepare_minilm"]


def default_cache() -> Path:
    """Where generated assets live: ``$BAYESQ_CACHE``, else ``~/.cache/bayesq-onnx``."""
    return Path(os.environ.get("BAYESQ_CACHE", Path.home() / ".cache" / "bayesq-onnx"))
