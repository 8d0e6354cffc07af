"""Tune: a pretrained model + a search space -> best hyperparameters and model (issue 6)."""
from keras_llm.components.base import PRETRAINED_MODEL, TUNING_RESULT, Component, Parameter

tune_component = Component(
    name="tune",
    description="Search fine-tuning hyperparameters with KerasTuner.",
    inputs={"pretrained": PRETRAINED_MODEL},
    outputs={"output_dir": TUNING_RESULT},
    parameters=[
        Parameter("search_space", str, help="a configs/tune-*.yaml name or path"),
        Parameter("tuner", str, default="random", help="random, bayesian or hyperband"),
        Parameter("max_trials", int, default=4, help="trials to run"),
        Parameter("objective", str, default="val_accuracy", help="logged metric to optimize"),
        Parameter("data", str, default="builtin", help="task data, as for finetune"),
        Parameter("seed", int, default=1337, help="random seed"),
    ],
    executor="keras_llm.tuning:tune",
)
