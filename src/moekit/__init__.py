"""moekit: run large Mixture-of-Experts language models on GPUs and machines too small for them."""

from .config import ModelConfig
from .errors import CheckpointError, MoekitError, UnsupportedModelError
from .generate import GenerationStats, generate
from .load import default_model_path, load_model, read_config
from .model import MoEModel
from .serve import LLM, SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "MoEModel", "Tokenizer", "GenerationStats", "LLM", "SamplingParams",
    "MoekitError", "CheckpointError", "UnsupportedModelError",
    "load_model", "load_tokenizer", "read_config", "generate", "default_model_path",
]
