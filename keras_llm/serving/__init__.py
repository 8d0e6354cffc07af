"""Serving exported models: a local server speaking TensorFlow Serving's REST API."""
from keras_llm.serving.rest import ModelServer, ServingError, make_server, predict, serve

__all__ = ["ModelServer", "ServingError", "make_server", "predict", "serve"]
