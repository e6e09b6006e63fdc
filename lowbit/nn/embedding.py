"""Embeddings: 32-bit-optimizer ``Embedding`` / ``StableEmbedding``, and quantized lookups
``Embedding4bit`` (NF4/FP4) and ``Embedding8bit`` (int8 rows), as in bitsandbytes.

Unlike bitsandbytes, the quantized embeddings can be saved and loaded (same entries as the
linear layers: ``weight.absmax``, ... for 4-bit; ``SCB``, ``weight_format`` for 8-bit).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks
from ..functional import block_absmax_of
from .checkpoint import QuantizedWeightMixin
from .int8params import Int8Params
from .params4bit import Params4bit

logger = logging.getLogger("lowbit")


def _check_indices(module: QuantizedWeightMixin, input: object) -> None:
    """Indices into a quantized table: integers on the table's device, each in [0, rows) (values
    checked where they sit on the host; on a GPU torch's kernel asserts)."""
    input = module._check_input(input, integer=True)
    num_embeddings = module.num_embeddings
    if checks.on_host(input) and input.numel():
        low, high = (int(v) for v in input.aminmax())
        if low < 0 or high >= num_embeddings:
            raise ValueError(f"input holds indices in [{low}, {high}], but the table has {num_embeddings} rows")


def _keep_32bit_optimizer_state(module: nn.Module) -> None:
    """Ask lowbit's 8-bit optimizers to keep 32-bit state for this embedding (bitsandbytes does:
    8-bit state makes embedding training unstable). A no-op while lowbit.optim is absent."""
    try:
        from ..optim import GlobalOptimManager
    except ImportError:
        return
    GlobalOptimManager.get_instance().register_module_override(module, "weight", {"optim_bits": 32})


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose weight an 8-bit optimizer updates with 32-bit state."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[torch.Tensor] = None,
        device=None,
    ):
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, _weight,
            device=device,
        )  # fmt: skip
        _keep_32bit_optimizer_state(self)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()


class StableEmbedding(Embedding):
    """``Embedding`` + Xavier init + a LayerNorm applied in full precision (stable 8-bit training)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[torch.Tensor] = None,
        device=None,
        dtype=None,
    ):
        nn.Embedding.__init__(
            self, num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            _weight, device, dtype,
        )  # fmt: skip
        self.norm = nn.LayerNorm(embedding_dim, device=device)
        _keep_32bit_optimizer_state(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = super().forward(input)
        # the layer norm always runs in full precision
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)


class Embedding4bit(QuantizedWeightMixin, nn.Embedding):
    """An embedding table stored in 4 bits; a lookup dequantizes only the rows it needs when
    ``embedding_dim`` is a multiple of the blocksize (else the whole table)."""

    weight_class = Params4bit

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: Optional[torch.dtype] = None,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device=None,
    ):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=None,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.quant_state = None
        self.quant_storage = quant_storage
        if embedding_dim % self.weight.blocksize != 0:
            logger.warning(
                "Embedding size %d is not divisible by block size %d. This will lead to slow inference.",
                embedding_dim,
                self.weight.blocksize,
            )

    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_indices(self, input)
        weight = self.quantized_weight()
        state = weight.quant_state
        if input.numel() == 0:  # nothing to look up (torch's embedding accepts this too)
            return torch.empty((*input.shape, self.embedding_dim), dtype=self.dtype, device=weight.device)
        absmax = block_absmax_of(state)
        if self.embedding_dim % state.blocksize == 0:
            # whole blocks per row: gather the packed rows and their absmax, dequantize just those
            packed = weight.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)
            blocks_per_row = self.embedding_dim // state.blocksize
            rows = F.embedding(input, packed)
            row_absmax = F.embedding(input, absmax.view(self.num_embeddings, blocks_per_row))
            out = torch.ops.lowbit.dequantize_4bit(
                rows.reshape(-1), row_absmax.reshape(-1), state.blocksize, state.quant_type,
                [*input.shape, self.embedding_dim], state.dtype,
            )  # fmt: skip
        else:
            table = torch.ops.lowbit.dequantize_4bit(
                weight.data, absmax, state.blocksize, state.quant_type, list(state.shape), state.dtype
            )
            out = F.embedding(input, table)
        return out.to(self.dtype)


class EmbeddingFP4(Embedding4bit):
    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(
            num_embeddings,
            embedding_dim,
            dtype=dtype,
            quant_type="fp4",
            quant_storage=quant_storage,
            device=device,
        )


class EmbeddingNF4(Embedding4bit):
    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(
            num_embeddings,
            embedding_dim,
            dtype=dtype,
            quant_type="nf4",
            quant_storage=quant_storage,
            device=device,
        )


class Embedding8bit(QuantizedWeightMixin, nn.Embedding):
    """An embedding table stored as int8 rows with one scale each (LLM.int8 weight format)."""

    weight_class = Int8Params

    def __init__(
        self, num_embeddings: int, embedding_dim: int, device=None, dtype: Optional[torch.dtype] = None
    ):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Int8Params(self.weight.data, has_fp16_weights=False, requires_grad=False)

    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_indices(self, input)
        weight = self.quantized_weight()
        rows = F.embedding(input, weight.data)
        scales = F.embedding(input, weight.SCB.view(self.num_embeddings, 1))
        return (rows * (scales / 127.0)).to(self.dtype)
