"""Model families built from `keras_llm.layers`: backbones and their task heads."""
from keras_llm.models.gpt import GPTBackbone, GPTCausalLM

__all__ = ["GPTBackbone", "GPTCausalLM"]
