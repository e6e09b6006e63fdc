"""Quantized layers with bitsandbytes' names, arguments and state-dict keys (``bitsandbytes.nn``)."""

import torch

from ..core.quant_state import QuantState
from . import parametrize  # bitsandbytes.nn.parametrize: 4-bit quantization of any nn.Parameter
from .checkpoint import CheckpointError, load_checkpoint
from .embedding import Embedding, Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, StableEmbedding
from .int8params import Int8Params
from .linear import Linear4bit, Linear8bitLt, LinearFP4, LinearNF4
from .parameter import _rebuild_quantized_parameter
from .params4bit import Params4bit

# torch.load(weights_only=True), torch's default, may rebuild quantized parameters.
torch.serialization.add_safe_globals([_rebuild_quantized_parameter, Params4bit, Int8Params, QuantState])

__all__ = [
    "CheckpointError",
    "Embedding",
    "Embedding4bit",
    "Embedding8bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "LinearFP4",
    "LinearNF4",
    "Params4bit",
    "StableEmbedding",
    "load_checkpoint",
    "parametrize",
]
