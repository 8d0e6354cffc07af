"""keras-llm: Transformer language models with TensorFlow and Keras, from raw text to TF Serving."""

__version__ = "0.1.0"
