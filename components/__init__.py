"""Pipeline components: thin declarations of inputs, outputs and parameters, TFX-style.

The work happens in executor functions inside `keras_llm/`; see `components/base.py` for
how the pipeline runner calls them, and `keras_llm.pipeline` for the runner itself.
"""
from keras_llm.components.base import Component, Parameter
from keras_llm.components.export import export_component
from keras_llm.components.finetune import finetune_component
from keras_llm.components.pretrain import pretrain_component
from keras_llm.components.tune import tune_component

COMPONENTS = {c.name: c for c in (pretrain_component, finetune_component, tune_component,
                                  export_component)}

__all__ = ["COMPONENTS", "Component", "Parameter", "export_component", "finetune_component",
           "pretrain_component", "tune_component"]
