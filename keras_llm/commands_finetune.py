"""`keras-llm finetune` and `keras-llm evaluate` (attached to the group in `cli.py`)."""
import json
import os
import sys

import click

from keras_llm.cli_errors import handle_errors

TASKS = ("classification", "causal_lm", "seq2seq")


@click.command("finetune", context_settings={"show_default": True})
@click.option("--config", "config_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="YAML of finetune options by name (learning_rate: 1.0e-3, ...), such as "
                   "the best_config.yaml of `keras-llm tune` with target finetune; options "
                   "given on the command line override it.")
@click.option("--model", "pretrained_dir", default=None,
              type=click.Path(exists=True, file_okay=False),
              help="Pretrained model artifact. Default: runs/gpt-tiny (what `keras-llm "
                   "pretrain` writes) when it exists.")
@click.option("--task", type=click.Choice(TASKS), default="classification",
              help="classification (one text or a pair), causal_lm (continued GPT "
                   "training on new text) or seq2seq (source -> target text).")
@click.option("--data", default="builtin",
              help="builtin (topic of standard-library docstrings), tfds:NAME[:SPLIT], or "
                   ".jsonl/.csv/.tsv files or globs (comma-separated).")
@click.option("--validation-data", default=None,
              help="Validation source. Default: builtin's validation split, or 10% of --data "
                   "split off by a hash of the text.")
@click.option("--text-column", default="text", help="Column with the (first / source) text.")
@click.option("--text-pair-column", default=None,
              help="Column with the second text of a pair (text-pair classification).")
@click.option("--label-column", default="label", help="Column with the class label.")
@click.option("--target-column", default="target", help="Column with the seq2seq target.")
@click.option("--output-dir", default=None,
              help="Where the fine-tuned artifact goes. Default: runs/<model name>-<task>.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=5e-4,
              help="Peak learning rate (AdamW, warmup then cosine decay).")
@click.option("--epochs", type=click.IntRange(min=1), default=3,
              help="Passes over the training data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Batch size.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warmup steps. Default: 10% of all steps.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.01,
              help="AdamW weight decay (not on biases and norms).")
@click.option("--freeze", default="none",
              help="none, embeddings, or blocks:K (the embeddings and the first K blocks).")
@click.option("--layerwise-lr-decay", type=click.FloatRange(min=0, max=1, min_open=True),
              default=1.0, help="Block i of L learns at decay**(L-i) of the rate, the "
                                "embeddings at decay**(L+1); 1.0 turns it off.")
@click.option("--class-weights", type=click.Choice(["none", "balanced"]), default="none",
              help="Weigh classes by inverse frequency (classification).")
@click.option("--early-stopping-metric", default=None,
              help="Stop when this validation metric stops improving and keep the best "
                   "weights: loss, accuracy, macro_f1 (classification), perplexity, "
                   "token_accuracy (seq2seq).")
@click.option("--patience", type=click.IntRange(min=1), default=2,
              help="Epochs without improvement before early stopping.")
@click.option("--max-seq-len", type=click.IntRange(min=4), default=None,
              help="Tokens per example after truncation. Default: min(128, the model's).")
@click.option("--pooling", type=click.Choice(["cls", "last", "mean"]), default=None,
              help="Classifier pooling: cls or mean for encoders, last or mean for GPT. "
                   "Default: cls for encoders, last for GPT.")
@click.option("--target-vocab-size", type=click.IntRange(min=16), default=None,
              help="seq2seq: train a separate target vocabulary of this size on the "
                   "training targets (e.g. the other language of a translation task); the "
                   "decoder gets a fresh embedding for it. Default: the model's own.")
@click.option("--seed", type=int, default=1337, help="Random seed.")
@click.option("--strategy", type=click.Choice(["auto", "default", "mirrored", "multi-worker",
                                               "tpu"]), default="auto",
              help="tf.distribute strategy; auto picks multi-worker from TF_CONFIG, mirrored "
                   "with >1 GPU.")
@click.option("--scale-lr/--no-scale-lr", default=False,
              help="Treat --batch-size as per replica and scale the learning rate linearly.")
@click.option("--mixed-precision/--no-mixed-precision", default=False,
              help="mixed_float16 on GPU (loss scaling), mixed_bfloat16 on CPU/TPU.")
@click.option("--xla/--no-xla", default=None,
              help="Compile the train step with XLA. Default: Keras decides (on for one GPU).")
@click.option("--overwrite", is_flag=True, help="Replace a finished model in --output-dir.")
@handle_errors
def finetune_command(config_file, pretrained_dir, output_dir, overwrite, **options):
    """Fine-tune a pretrained artifact; with no options, classify the built-in corpus's
    docstrings by standard-library area, starting from runs/gpt-tiny."""
    from keras_llm.training.finetune import DEFAULT_PRETRAINED_DIR, finetune, load_options

    context = click.get_current_context()
    given = {name: value for name, value in options.items()
             if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    settings = load_options(config_file, overrides=given)
    parent = pretrained_dir or DEFAULT_PRETRAINED_DIR
    output_dir = output_dir or os.path.join(
        "runs", f"{os.path.basename(os.path.normpath(parent))}-{settings.task}")
    metrics = finetune(settings, pretrained_dir, output_dir, overwrite=overwrite,
                       command=sys.argv)
    shown = {k: v for k, v in metrics.items() if k.startswith("val_")}
    click.echo("  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    click.echo(f"{metrics['epochs']} epochs, {metrics['steps']} steps in "
               f"{metrics['train_seconds']:.0f}s")
    click.echo(f"model artifact: {output_dir}")


@click.command("evaluate", context_settings={"show_default": True})
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default=None,
              help="Labeled data (same forms as finetune --data). Default: builtin:test for "
                   "a model fine-tuned on the built-in task.")
@click.option("--text-column", default=None, help="Default: the column used in fine-tuning.")
@click.option("--text-pair-column", default=None,
              help="Default: the column used in fine-tuning.")
@click.option("--label-column", default=None, help="Default: the column used in fine-tuning.")
@click.option("--target-column", default=None, help="Default: the column used in fine-tuning.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Batch size.")
@click.option("--decoding", type=click.Choice(["greedy", "beam"]), default="greedy",
              help="Seq2seq decoding for BLEU.")
@click.option("--num-beams", type=click.IntRange(min=1), default=4, help="Beams for beam.")
@click.option("--output", default=None, type=click.Path(dir_okay=False),
              help="Where to write the report. Default: MODEL_DIR/eval.json.")
@click.option("--predictions", default=None, type=click.Path(dir_okay=False),
              help="Write one JSON line per example (input, truth, prediction) here.")
@handle_errors
def evaluate_command(model_dir, data, text_column, text_pair_column, label_column,
                     target_column, batch_size, decoding, num_beams, output, predictions):
    """Score MODEL_DIR on --data: accuracy, precision/recall/F1 and confusion matrix for
    classifiers, perplexity for language models, BLEU and token accuracy for seq2seq."""
    from keras_llm.artifacts import write_json
    from keras_llm.evaluation import EVAL_FILE, evaluate_artifact, format_report

    columns = {"text": text_column, "text_pair": text_pair_column, "label": label_column,
               "target": target_column}
    report, rows = evaluate_artifact(model_dir, data, columns, batch_size, decoding,
                                     num_beams)
    if predictions:
        if rows is None:
            raise click.UsageError("--predictions: a language model's evaluation has no "
                                   "per-example predictions")
        from keras_llm.artifacts import atomic_write

        atomic_write(predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in rows))
    output = output or os.path.join(model_dir, EVAL_FILE)
    write_json(output, report)
    click.echo(format_report(report))
    click.echo(f"report: {output}" + (f"; predictions: {predictions}" if predictions else ""))
