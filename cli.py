"""The `keras-llm` command line (installed as `keras_llm.cli`).

One function per command; heavy imports (TensorFlow) happen inside the commands so that
`keras-llm --help` answers at once. Errors the user can fix print one line: exit code 2 for
bad usage (options, configs), 1 for runtime failures (data, artifacts).
"""
import logging
import os
import sys

import click

from keras_llm.cli_errors import handle_errors

# TensorFlow's C++ start-up chatter hides the progress bar; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "show_default": True})
@click.version_option(package_name="keras-llm")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def main(verbose):
    """Build, pretrain, fine-tune and export Transformer language models."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_settings(settings):
    """`--set key=value` pairs as config overrides; values are read as YAML scalars."""
    import yaml

    overrides = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {setting!r}", param_hint="--set")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@main.command()
@click.option("--config", "config_name", default="gpt-tiny",
              help="A built-in config name (see `keras-llm configs`) or a YAML file.")
@click.option("--data", default=None,
              help="'builtin' (the standard library's docstrings), files or globs "
                   "(.txt, .jsonl, .csv, .tsv; comma-separated), or tfds:NAME[:SPLIT]. "
                   "Default: the config's data.source.")
@click.option("--text-field", default=None,
              help="JSONL field or CSV/TSV column holding the text. Default: data.text_field.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(exists=True),
              help="Load this tokenizer directory instead of training one.")
@click.option("--output-dir", default=None,
              help="Where the model artifact goes. Default: runs/<config name>.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps. Default: train.steps.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the training split (overrides --steps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Global batch size in sequences. Default: train.batch_size.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per training sequence. Default: data.seq_len.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate. Default: train.learning_rate.")
@click.option("--seed", type=int, default=None, help="Random seed. Default: train.seed.")
@click.option("--strategy", type=click.Choice(["auto", "default", "mirrored", "multi-worker",
                                               "tpu"]), default=None,
              help="tf.distribute strategy; auto picks multi-worker from TF_CONFIG, mirrored "
                   "with >1 GPU. Default: train.strategy.")
@click.option("--mixed-precision/--no-mixed-precision", default=None,
              help="mixed_float16 on GPU (loss scaling), mixed_bfloat16 on CPU/TPU.")
@click.option("--xla/--no-xla", default=None, help="Compile the train step with XLA.")
@click.option("--grad-accum-steps", type=click.IntRange(min=1), default=None,
              help="Accumulate gradients over N batches per update.")
@click.option("--steps-per-execution", type=click.IntRange(min=1), default=None,
              help="Train steps per compiled call.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Checkpoint every N steps (and at every evaluation).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=None,
              help="How many recent checkpoints to keep.")
@click.option("--scale-lr/--no-scale-lr", default=None,
              help="Treat --batch-size as per replica and scale the learning rate linearly.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set model.dropout=0.1 (repeatable).")
@click.option("--restart", is_flag=True,
              help="Ignore the checkpoints of an unfinished run in --output-dir; start over.")
@click.option("--overwrite", is_flag=True, help="Replace a finished model in --output-dir.")
@handle_errors
def pretrain(config_name, data, text_field, tokenizer_path, output_dir, steps, epochs,
             batch_size, seq_len, learning_rate, seed, strategy, mixed_precision, xla,
             grad_accum_steps, steps_per_execution, checkpoint_every, keep_checkpoints,
             scale_lr, settings, restart, overwrite):
    """Pretrain a language model; with no options, gpt-tiny on the built-in corpus.

    Writes a model artifact (weights, tokenizer, resolved config, metrics.json,
    metadata.json, TensorBoard logs) to --output-dir and prints the validation
    perplexity next to a unigram baseline. Rerunning an interrupted run in the same
    --output-dir resumes it exactly from its last checkpoint.
    """
    from keras_llm.config import load_config
    from keras_llm.training.pretrain import pretrain as run_pretrain

    options = {
        "data.source": data, "data.text_field": text_field, "train.steps": steps,
        "train.epochs": epochs, "train.batch_size": batch_size, "data.seq_len": seq_len,
        "train.learning_rate": learning_rate, "train.seed": seed,
        "train.strategy": strategy, "train.mixed_precision": mixed_precision,
        "train.xla": xla, "train.grad_accum_steps": grad_accum_steps,
        "train.steps_per_execution": steps_per_execution,
        "train.checkpoint_every": checkpoint_every,
        "train.keep_checkpoints": keep_checkpoints, "train.scale_lr": scale_lr,
    }
    # An option the user gave wins over --set of the same key; one left unset (None) does not
    # erase it.
    config = load_config(config_name, overrides={
        **parse_settings(settings), **{k: v for k, v in options.items() if v is not None}})
    output_dir = output_dir or os.path.join("runs", config.name)
    metrics = run_pretrain(config, output_dir, tokenizer_path=tokenizer_path,
                           overwrite=overwrite, restart=restart, command=sys.argv)
    if "unigram_val_perplexity" in metrics:
        click.echo(f"validation perplexity {metrics['val_perplexity']:.2f} "
                   f"(unigram baseline {metrics['unigram_val_perplexity']:.2f})")
    click.echo(f"validation loss {metrics['val_loss']:.4f} after {metrics['steps']} steps in "
               f"{metrics['train_seconds']:.0f}s ({metrics['train_tokens_per_second']:.0f} "
               f"tokens/s)")
    click.echo(f"model artifact: {output_dir}")


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("prompts", nargs=-1)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64,
              help="Tokens to generate after each prompt.")
@click.option("--sampler", type=click.Choice(["greedy", "top_k", "top_p", "random", "beam"]),
              default="top_p", help="How the next token is chosen.")
@click.option("--num-beams", type=click.IntRange(min=1), default=4, help="Beams for beam.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0,
              help="Logit temperature (not used by greedy).")
@click.option("--top-k", type=click.IntRange(min=1), default=50, help="k for --sampler top_k.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.9,
              help="p for --sampler top_p.")
@click.option("--seed", type=int, default=None, help="Sampling seed, for repeatable output.")
@click.option("--xla/--no-xla", default=False,
              help="Compile the decoding loop with XLA: several times faster per call, but "
                   "the first call at each batch size and length compiles for a few seconds.")
@handle_errors
def generate(model_dir, prompts, max_new_tokens, sampler, num_beams, temperature, top_k, top_p,
             seed, xla):
    """Continue PROMPTS (or an empty prompt) with the model in MODEL_DIR, using its KV cache;
    for a seq2seq model, PROMPTS are source texts and the targets are printed."""
    from keras_llm.artifacts import load_model_artifact
    from keras_llm.generation import TextGenerator, make_generator

    artifact = load_model_artifact(model_dir)
    if max_new_tokens >= artifact.model.backbone.max_length:
        raise click.BadParameter(
            f"must be below the model's context length ({artifact.model.backbone.max_length})",
            param_hint="--max-new-tokens")
    generator = make_generator(artifact.model, artifact.tokenizer, artifact.target_tokenizer,
                               jit_compile=xla)
    prompts = list(prompts) or [""]
    outputs = generator.generate(prompts, max_new_tokens=max_new_tokens, sampler=sampler,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 num_beams=num_beams)
    continues = isinstance(generator, TextGenerator)  # seq2seq prints the target alone
    for prompt, output in zip(prompts, outputs):
        click.echo(prompt + output if continues else output)


@main.command("configs")
def list_configs():
    """List the built-in configs."""
    from keras_llm.config import builtin_config_names, read_config_file

    for name in builtin_config_names():
        values, _ = read_config_file(name)
        model = values.get("model", {})
        click.echo(f"{name:16s} {values.get('task', 'causal_lm'):10s} "
                   f"{model.get('family', '?'):8s} layers={model.get('num_layers')} "
                   f"hidden={model.get('hidden_size')} heads={model.get('num_heads')}")


@main.group()
def tokenizer():
    """Train or inspect subword tokenizers."""


@tokenizer.command("train")
@click.option("--kind", type=click.Choice(["bpe", "wordpiece", "sentencepiece"]),
              default="bpe", help="bpe for GPT, wordpiece for BERT-family, sentencepiece "
                                  "for seq2seq.")
@click.option("--data", default="builtin", help="builtin, tfds:NAME[:SPLIT], or files/globs.")
@click.option("--text-field", default="text", help="JSONL field / CSV column with the text.")
@click.option("--vocab-size", type=click.IntRange(min=16), default=8192,
              help="Largest vocabulary to learn.")
@click.option("--lowercase", is_flag=True, help="Lowercase text first.")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Directory to write (load later with --tokenizer DIR).")
@handle_errors
def train_tokenizer_command(kind, data, text_field, vocab_size, lowercase, output):
    """Train a tokenizer on --data and save it to --output."""
    from keras_llm.data import open_source, train_tokenizer

    source = open_source(data, text_field=text_field)
    trained = train_tokenizer(kind, source.texts(), vocab_size, lowercase=lowercase)
    trained.save(output)
    sample = source.texts()[0][:60]
    click.echo(f"{kind} tokenizer with {trained.vocabulary_size()} tokens written to {output}")
    click.echo(f"{sample!r} -> {trained.encode([sample])[0][:16]}")


def _attach_subcommands():
    from keras_llm.commands_export import export
    from keras_llm.commands_finetune import evaluate_command, finetune_command
    from keras_llm.commands_tune import tune
    from keras_llm.pipeline.cli import pipeline
    from keras_llm.serving.cli import serve_command

    main.add_command(pipeline)
    main.add_command(serve_command)
    main.add_command(export)
    main.add_command(tune)
    main.add_command(finetune_command)
    main.add_command(evaluate_command)


_attach_subcommands()

if __name__ == "__main__":
    main()
