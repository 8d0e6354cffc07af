"""Export: a model artifact -> a SavedModel base directory in TF Serving's layout (issue 7)."""
from keras_llm.components.base import (
    EXPORTED_MODEL,
    FINETUNED_MODEL,
    PRETRAINED_MODEL,
    TUNING_RESULT,
    Component,
    Parameter,
)

export_component = Component(
    name="export",
    description="Export a model as a SavedModel with string signatures, for TF Serving.",
    inputs={"model_dir": (FINETUNED_MODEL, TUNING_RESULT, PRETRAINED_MODEL)},
    outputs={"output": EXPORTED_MODEL},
    parameters=[
        Parameter("version", int, default=None,
                  help="version number; default: the next one under the output"),
    ],
    executor="keras_llm.export:export",
)
