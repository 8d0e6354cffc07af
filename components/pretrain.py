"""Pretrain: raw text -> a pretrained model artifact (`keras_llm.training.pretrain.pretrain`)."""
from keras_llm.components.base import CONFIG, PRETRAINED_MODEL, Component, Parameter

pretrain_component = Component(
    name="pretrain",
    description="Pretrain a language model on the config's data source.",
    inputs={},
    outputs={"output_dir": PRETRAINED_MODEL},
    parameters=[
        Parameter("config", CONFIG, help="a model config name/path, or {base, overrides}"),
    ],
    executor="keras_llm.training.pretrain:pretrain",
)
