"""`keras-llm serve`: attached to the main command group in `cli.py`."""
import click


@click.command("serve", context_settings={"show_default": True})
@click.argument("export_base", type=click.Path(exists=True, file_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), default=8501,
              help="HTTP port (TF Serving's REST default is 8501; 0 picks a free one).")
@click.option("--host", default="127.0.0.1",
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--model-name", default=None,
              help="NAME in /v1/models/NAME. Default: EXPORT_BASE's directory name.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None,
              help="Refuse requests with more instances than this (INVALID_ARGUMENT).")
@click.option("--poll-seconds", type=click.FloatRange(min=0, min_open=True), default=1.0,
              help="How often EXPORT_BASE is checked for a new version.")
def serve_command(export_base, port, host, model_name, max_batch_size, poll_seconds):
    """Serve the newest SavedModel version under EXPORT_BASE with TF Serving's REST API.

    EXPORT_BASE holds numeric version directories (`EXPORT_BASE/1/saved_model.pb`, ...),
    as `keras-llm export` writes them. New versions are picked up while serving.
    """
    from keras_llm.errors import KerasLLMError
    from keras_llm.serving.rest import make_server, run_until_interrupted

    try:
        server = make_server(export_base, port=port, host=host, model_name=model_name,
                             max_batch_size=max_batch_size, poll_seconds=poll_seconds)
    except KerasLLMError as e:
        raise click.ClickException(str(e))
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror}")
    latest = server.versions.latest
    click.echo(f"serving {server.model_name} version "
               f"{latest.version if latest else '(none yet)'} at {server.url} "
               f"(Ctrl-C to stop)")
    run_until_interrupted(server)
