"""`keras-llm export`: attached to the main command group in `cli.py`."""
import os

import click

from keras_llm.cli_errors import handle_errors


@click.command("export", context_settings={"show_default": True})
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Export base directory (TF Serving's model base path); the version is "
                   "written to OUTPUT/<version>/.")
@click.option("--version", "version", type=click.IntRange(min=1), default=None,
              help="Version number. Default: one more than the newest under --output. An "
                   "existing version is refused, never overwritten.")
@click.option("--no-validate", is_flag=True,
              help="Skip reloading the SavedModel with plain TensorFlow and comparing it "
                   "with the Keras model.")
@click.option("--xla", is_flag=True,
              help="Compile the generate signature's decoding loop with XLA (GPT and seq2seq "
                   "models): several times faster per call, but each new batch size and "
                   "length compiles first, and the server needs TensorFlow's XLA JIT.")
@handle_errors
def export(model_dir, output, version, no_validate, xla):
    """Export MODEL_DIR as a SavedModel with string-in, string-out signatures for TF Serving.

    GPT and seq2seq models get `generate(prompt, max_new_tokens, temperature, top_k) -> text`
    (also `serving_default`), BERT-family encoders `embed(text) -> pooled`. The tokenizer and
    the decoding loop run inside the graph. See `saved_model_cli show --dir OUTPUT/<version>
    --all` for the signatures, and `keras-llm serve OUTPUT` to try it.
    """
    from keras_llm.artifacts import read_json
    from keras_llm.export import ASSETS_EXTRA, export as export_model

    version_dir = export_model(model_dir, output, version=version, validate=not no_validate,
                               xla=xla)
    record = read_json(os.path.join(version_dir, ASSETS_EXTRA, "metadata.json"))
    click.echo(f"exported {model_dir} ({record['kind']}{', XLA' if xla else ''}) to "
               f"{version_dir}"
               f"{'' if no_validate else ' (validated with plain TensorFlow)'}")
    for name, signature in sorted(record["signatures"].items()):
        inputs = ", ".join(f"{key}: {value}" for key, value in signature["inputs"].items())
        outputs = ", ".join(f"{key}: {value}" for key, value in signature["outputs"].items())
        click.echo(f"  {name}({inputs}) -> {outputs}")
