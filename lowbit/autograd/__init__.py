"""Differentiable matrix products with quantized weights (``bitsandbytes.autograd``'s API).

* :func:`matmul_4bit`: ``A @ dequantize_4bit(B).T + bias`` for an NF4/FP4 weight (QLoRA).
* :func:`matmul`: LLM.int8 ``A @ B.T + bias`` with an int8 weight held in a
  :class:`MatmulLtState`, optionally with outlier decomposition (``threshold``).

Both give gradients for ``A`` and ``bias``; the int8 product also for a float (``has_fp16_weights``)
weight. Without a gradient to compute, neither builds an autograd node, so ``torch.compile``
traces inference straight through the ``torch.ops.lowbit`` custom ops.
"""

from .matmul_4bit import MatMul4Bit, matmul_4bit
from .matmul_8bit import MatMul8bitFp, MatMul8bitLt, MatmulLtState, matmul

__all__ = ["MatMul4Bit", "MatMul8bitFp", "MatMul8bitLt", "MatmulLtState", "matmul", "matmul_4bit"]
