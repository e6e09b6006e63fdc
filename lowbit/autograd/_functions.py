"""Import path of ``bitsandbytes.autograd._functions``, which some user code imports directly."""

from .matmul_4bit import MatMul4Bit, matmul_4bit
from .matmul_8bit import MatMul8bitFp, MatMul8bitLt, MatmulLtState, matmul

__all__ = ["MatMul4Bit", "MatMul8bitFp", "MatMul8bitLt", "MatmulLtState", "matmul", "matmul_4bit"]
