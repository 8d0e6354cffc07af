"""Finetune: a pretrained model + task data -> a fine-tuned model (issue 4's executor)."""
from keras_llm.components.base import FINETUNED_MODEL, PRETRAINED_MODEL, Component, Parameter

finetune_component = Component(
    name="finetune",
    description="Fine-tune a pretrained model on a classification, seq2seq or LM task.",
    inputs={"pretrained": PRETRAINED_MODEL},
    outputs={"output_dir": FINETUNED_MODEL},
    parameters=[
        Parameter("data", str, default="builtin",
                  help="'builtin' (docstring topics), a CSV/TSV/JSONL file, or tfds:NAME"),
        Parameter("text_column", str, default="text", help="column holding the text"),
        Parameter("text_pair_column", str, default=None, help="second text, for pairs"),
        Parameter("label_column", str, default="label", help="column holding the label"),
        Parameter("epochs", int, default=3, help="passes over the training split"),
        Parameter("batch_size", int, default=32, help="global batch size"),
        Parameter("learning_rate", float, default=5e-5, help="peak learning rate"),
        Parameter("max_length", int, default=128, help="tokens per example, truncated"),
        Parameter("seed", int, default=1337, help="random seed"),
    ],
    executor="keras_llm.pipeline.executors:finetune",
)
