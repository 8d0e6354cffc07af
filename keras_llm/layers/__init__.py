"""Transformer building blocks, written with `keras.ops` only (backend-agnostic)."""
from keras_llm.layers.attention import MultiHeadAttention, causal_mask, merge_masks
from keras_llm.layers.normalization import LayerNormalization
from keras_llm.layers.position import LearnedPositionEmbedding, SinusoidalPositionEncoding
from keras_llm.layers.transformer import (
    FeedForward,
    TransformerDecoderBlock,
    TransformerEncoderBlock,
)

__all__ = [
    "FeedForward",
    "LayerNormalization",
    "LearnedPositionEmbedding",
    "MultiHeadAttention",
    "SinusoidalPositionEncoding",
    "TransformerDecoderBlock",
    "TransformerEncoderBlock",
    "causal_mask",
    "merge_masks",
]
