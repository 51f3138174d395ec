"""dsv3: DeepSeek-V3 in plain PyTorch."""
from dsv3.checkpoint import load_model, save_model
from dsv3.config import ModelConfig
from dsv3.infer.generate import generate
from dsv3.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "load_model", "save_model", "generate"]
__version__ = "0.1.0"
