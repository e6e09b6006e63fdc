"""Import path of ``bitsandbytes.nn.modules``, which some user code imports directly."""

from . import (  # noqa: F401
    Embedding,
    Embedding4bit,
    Embedding8bit,
    EmbeddingFP4,
    EmbeddingNF4,
    Int8Params,
    Linear4bit,
    Linear8bitLt,
    LinearFP4,
    LinearNF4,
    Params4bit,
    StableEmbedding,
)
