"""Fine-tuning task heads on pretrained backbones."""
from keras_llm.tasks.classification import TextClassifier

__all__ = ["TextClassifier"]
