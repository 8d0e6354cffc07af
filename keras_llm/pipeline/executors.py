"""Executors whose work lives elsewhere but whose call differs from their component's.

The runner calls an executor with one keyword per input, output and parameter (see
`keras_llm.components.base`); `keras_llm.training.finetune.finetune` takes a
`FinetuneOptions` instead, so the finetune component's executor builds one here.
"""


def finetune(pretrained, output_dir, max_length=None, **options):
    """The finetune component: fine-tunes `pretrained` into `output_dir`.

    `options` are `FinetuneOptions` fields (`data`, `epochs`, `learning_rate`, ...);
    `max_length` is the component's name for `max_seq_len`. Returns the run's metrics.
    """
    from keras_llm.training import finetune as training

    return training.finetune(training.FinetuneOptions(max_seq_len=max_length, **options),
                             pretrained, output_dir)
