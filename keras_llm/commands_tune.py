"""`keras-llm tune`: hyperparameter search with KerasTuner (see `keras_llm.tuning`).

Attached to the `keras-llm` group in cli.py; TensorFlow is imported inside the command so
that `keras-llm --help` answers at once.
"""
import os
import sys

import click

from keras_llm.cli_errors import handle_errors


@click.command("tune")
@click.option("--config", "search_space", default="tune-gpt-tiny",
              help="A search space: a built-in configs/tune-*.yaml name or a YAML file.")
@click.option("--tuner", type=click.Choice(["random", "bayesian", "hyperband"]), default=None,
              help="Search algorithm. Default: the space's `tuner`, else random.")
@click.option("--max-trials", type=click.IntRange(min=1), default=None,
              help="Trials in the whole search (a resumed search counts the earlier ones). "
                   "Default: the space's `max_trials`, else 10.")
@click.option("--objective", default=None,
              help="Metric to optimize: any metric the trials report (val_loss, "
                   "val_perplexity, val_accuracy, ...). Default: the space's, else val_loss.")
@click.option("--direction", type=click.Choice(["min", "max"]), default=None,
              help="Minimize or maximize --objective. Default: min for losses and "
                   "perplexities, max otherwise.")
@click.option("--steps-per-trial", type=click.IntRange(min=1), default=None,
              help="Training steps per trial (Hyperband's early rounds get a fraction). "
                   "Default: the space's `steps_per_trial`, else the base's train.steps.")
@click.option("--patience", type=click.IntRange(min=0), default=2,
              help="Evaluations without improvement before a trial stops early (0: never).")
@click.option("--output-dir", default=None,
              help="Search state, trials and results. Default: runs/<search space name>.")
@click.option("--data", default=None, help="Overrides the trials' data source.")
@click.option("--pretrained", default=None, type=click.Path(exists=True, file_okay=False),
              help="Pretrained model artifact (search spaces with target: finetune).")
@click.option("--seed", type=int, default=1337, help="Seed of the search's sampling.")
@click.option("--restart", is_flag=True,
              help="Start over instead of resuming the search in --output-dir.")
@click.option("--role", type=click.Choice(["chief", "worker"]), default=None,
              help="Distributed search: the chief serves the oracle and writes the results; "
                   "workers run trials. Start one chief and any number of workers with the "
                   "same options and --oracle-port.")
@click.option("--tuner-id", default=None, help="A worker's name, unique among the workers.")
@click.option("--oracle-ip", default="127.0.0.1", help="The chief's address.")
@click.option("--oracle-port", type=click.IntRange(min=1, max=65535), default=None,
              help="The chief's port.")
@click.option("--in-process", is_flag=True,
              help="Run trials in this process (faster start; memory may grow with what "
                   "TensorFlow keeps from each trial) instead of a fresh process each.")
@click.option("--summary", is_flag=True,
              help="Print the results table of the search in --output-dir and exit.")
@handle_errors
def tune(search_space, tuner, max_trials, objective, direction, steps_per_trial, patience,
         output_dir, data, pretrained, seed, restart, role, tuner_id, oracle_ip, oracle_port,
         in_process, summary):
    """Search hyperparameters with KerasTuner; each trial is a short training run.

    Writes best_config.yaml (accepted by `keras-llm pretrain --config`, or with target
    finetune by `keras-llm finetune --config`), best_model, results.csv/.json and
    metadata.json to --output-dir. Rerun the same command to resume an interrupted search.
    """
    from keras_llm import tuning

    if output_dir is None:
        output_dir = os.path.join("runs", tuning.load_search_space(search_space).name)
    if summary:
        click.echo(tuning.summary_table(output_dir))
        return
    if role is not None:
        os.environ.update(tuning.distributed_environment(role, tuner_id, oracle_ip,
                                                         oracle_port))
    results = tuning.tune(
        search_space, output_dir, tuner=tuner, max_trials=max_trials, objective=objective,
        direction=direction, steps_per_trial=steps_per_trial, restart=restart, seed=seed,
        patience=patience or None, pretrained=pretrained, data=data, in_process=in_process,
        command=sys.argv, verbose=1)
    if results is None:
        click.echo(f"worker {os.environ['KERASTUNER_TUNER_ID']}: no trials left")
        return
    click.echo(tuning.summary_table(output_dir))
    click.echo(f"best config: {os.path.join(output_dir, tuning.BEST_CONFIG_FILE)}")
    click.echo(f"best model: {os.path.join(output_dir, tuning.BEST_MODEL_LINK)}")
