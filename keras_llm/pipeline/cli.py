"""`keras-llm pipeline run|lineage`: attached to the main command group in `cli.py`."""
import json

import click

from keras_llm.cli_errors import handle_errors


pipeline = click.Group(
    "pipeline", context_settings={"show_default": True},
    help="Run component pipelines (configs/pipeline-*.yaml) and trace their artifacts.")


@pipeline.command("run")
@click.argument("config")
@click.option("--root", default=None,
              help="Pipeline root (artifacts and metadata.sqlite). Default: the config's root.")
@handle_errors
def run_command(config, root):
    """Run the components of CONFIG in order, skipping those whose inputs and parameters
    are unchanged since a complete run (cache hits). CONFIG is a YAML path or the name of
    a shipped pipeline (pipeline-tiny)."""
    from keras_llm.pipeline.runner import load_pipeline, run_pipeline

    loaded = load_pipeline(config, root=root)
    click.echo(f"pipeline {loaded.name}: {len(loaded.nodes)} components, root {loaded.root}")

    def report(result):
        if result.status == "failed":
            click.echo(f"  {result.node:12s} failed")
            return
        how = (f"cached (execution {result.execution_id})" if result.status == "cached" else
               f"ran    (execution {result.execution_id}, {result.seconds:.1f}s)")
        outputs = ", ".join(f"{name}={uri}" for name, uri in result.outputs.items())
        click.echo(f"  {result.node:12s} {how} -> {outputs}")

    run_pipeline(loaded, report=report)


@pipeline.command("lineage")
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--root", default=None, type=click.Path(exists=True, file_okay=False),
              help="Pipeline root holding metadata.sqlite. Default: found above ARTIFACT.")
@click.option("--json", "as_json", is_flag=True, help="Print the lineage tree as JSON.")
@handle_errors
def lineage_command(artifact, root, as_json):
    """Show which executions produced ARTIFACT, from which artifacts, back to the start."""
    from keras_llm.pipeline.runner import describe_lineage, lineage

    tree = lineage(artifact, root=root)
    if as_json:
        click.echo(json.dumps(tree, indent=2, sort_keys=True, default=str))
    else:
        click.echo("\n".join(describe_lineage(tree)))
