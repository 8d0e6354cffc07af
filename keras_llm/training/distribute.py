"""tf.distribute for every training command: which strategy, how big a batch, which seed.

Batch and learning-rate rule: `train.batch_size` is the GLOBAL batch, whatever the number of
replicas; each replica gets `batch_size / replicas` rows, and the learning rate is left alone
(same global batch, same gradient, same learning rate). With `--scale-lr` the batch size is
read as PER REPLICA instead: the global batch becomes `batch_size * replicas` and the
learning rate is multiplied by `replicas` (the linear scaling rule of Goyal et al., 2017,
"Accurate, Large Minibatch SGD"; keep the warmup when you use it).

Input: every worker reads the same stream of global batches (same shuffle seed) and takes
its own replicas' rows of each (sharding by data, at the row level). So a run on R replicas
sees exactly the batches a run on one device sees, and the tf.data iterator stays a plain,
checkpointable `tf.data.Iterator` (a `tf.distribute` iterator cannot be checkpointed). The
datasets also carry `AutoShardPolicy.DATA`, which is what `model.evaluate` uses when Keras
distributes a validation set itself. Randomness inside the pipeline that should differ per
worker (e.g. dynamic masking) takes `worker_seed(seed, strategy)`.

Example:

>>> strategy = make_strategy("default")
>>> per_replica_batch_size(32, strategy)
32
"""
import json
import logging
import os

import tensorflow as tf

from keras_llm.errors import ConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi-worker", "tpu")


def tf_config_cluster():
    """The cluster named by the `TF_CONFIG` environment variable, or None."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        cluster = json.loads(text).get("cluster") or {}
    except (ValueError, AttributeError):
        raise ConfigError("TF_CONFIG is not a JSON object with a 'cluster' and a 'task'")
    return cluster if sum(len(hosts) for hosts in cluster.values()) > 0 else None


def make_strategy(name="auto"):
    """The `tf.distribute.Strategy` for `--strategy NAME`.

    `auto`: MultiWorkerMirroredStrategy when TF_CONFIG names a cluster of more than one task,
    MirroredStrategy when more than one GPU is visible, else the default (one device).
    """
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    if name == "auto":
        cluster = tf_config_cluster()
        if cluster and sum(len(hosts) for hosts in cluster.values()) > 1:
            name = "multi-worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if tf_config_cluster() is None:
            raise ConfigError("--strategy multi-worker needs TF_CONFIG naming the cluster and "
                              "this task (see the README's multi-worker section)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=os.environ.get("TPU_NAME", ""))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as e:  # the resolver raises several types when there is no TPU
        raise ConfigError(f"--strategy tpu: no TPU found ({str(e).splitlines()[0]})")
    return tf.distribute.TPUStrategy(resolver)


def worker_count_and_index(strategy):
    """`(number of workers, this worker's index)`; the chief is index 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 1, 0
    jobs = resolver.cluster_spec().as_dict()
    chiefs = len(jobs.get("chief", []))
    workers = chiefs + len(jobs.get("worker", []))
    if resolver.task_type == "chief":
        return max(workers, 1), 0
    return max(workers, 1), chiefs + (resolver.task_id or 0)


def is_chief(strategy):
    return worker_count_and_index(strategy)[1] == 0


def describe_strategy(strategy):
    """A dict for logs and metadata: strategy class, replicas, workers, this worker."""
    workers, index = worker_count_and_index(strategy)
    return {"strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
            "workers": workers, "worker_index": index}


def per_replica_batch_size(global_batch_size, strategy):
    """Rows each replica gets from a global batch; it must divide evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ConfigError(
            f"train.batch_size ({global_batch_size}) must be divisible by the number of "
            f"replicas ({replicas})")
    return global_batch_size // replicas


def batch_and_learning_rate(batch_size, learning_rate, strategy, scale_lr=False):
    """`(global batch, per-replica batch, learning rate)` under the rule in the module doc."""
    replicas = strategy.num_replicas_in_sync
    if scale_lr:
        global_batch, learning_rate = batch_size * replicas, learning_rate * replicas
    else:
        global_batch = batch_size
    per_replica = per_replica_batch_size(global_batch, strategy)
    logger.info("%d replica(s): global batch %d, %d per replica, learning rate %g%s",
                replicas, global_batch, per_replica, learning_rate,
                " (scaled by replicas)" if scale_lr and replicas > 1 else "")
    return global_batch, per_replica, learning_rate


def worker_seed(seed, strategy):
    """A seed for randomness that should differ between workers (not for shuffling, which
    must agree so that workers slice the same global batches)."""
    return seed + 1000003 * worker_count_and_index(strategy)[1]


def with_data_sharding(dataset):
    """`dataset` with `AutoShardPolicy.DATA` (shard by elements, not by files)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def replica_batches(batches, strategy):
    """Yields, for each global batch of `batches`, the per-replica values for `strategy.run`.

    Each replica (numbered globally across workers) takes its contiguous rows, so the global
    batch is the same as on one device. With a single replica the batches pass through.
    """
    replicas = strategy.num_replicas_in_sync
    for batch in batches:
        if replicas == 1:
            yield batch
            continue
        rows = int(tf.nest.flatten(batch)[0].shape[0])
        per_replica = per_replica_batch_size(rows, strategy)

        def replica_rows(context, batch=batch, per_replica=per_replica):
            start = context.replica_id_in_sync_group * per_replica
            return tf.nest.map_structure(lambda t: t[start:start + per_replica], batch)

        yield strategy.experimental_distribute_values_from_function(replica_rows)
