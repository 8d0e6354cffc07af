"""Runs a pipeline of components (`configs/pipeline-*.yaml`) in order, TFX-style.

Each component gets its inputs from earlier components' outputs (or from an existing
artifact directory), writes its outputs to fresh directories
`ROOT/<component id>/<output>/<execution id>/`, and is recorded in the metadata store
`ROOT/metadata.sqlite`. A component whose parameters and input fingerprints equal those of
an earlier complete execution, and whose outputs are still there unchanged, is not run
again (a cache hit). A failing component stops the run; the artifacts before it stay, and
the next run continues from it because everything before it is a cache hit.

Pipeline config (validated when loaded; an error names the key):

    name: pipeline-tiny          # scope of the cache and of the records
    root: runs/pipeline-tiny     # artifacts + metadata.sqlite (default runs/<name>)
    components:                  # run in this order
      - id: pretrain             # unique; default: the component name
        component: pretrain      # a declaration from keras_llm.components
        parameters: {config: gpt-tiny}
      - component: export
        inputs:
          model_dir: pretrain.output_dir     # <earlier id>.<its output>, or {uri: DIR}

Example (executors are imported when their component runs):

>>> results = run_pipeline("configs/pipeline-tiny.yaml")    # doctest: +SKIP
>>> [(r.node, r.status) for r in results]                   # doctest: +SKIP
[('pretrain', 'cached'), ('finetune', 'ran'), ('tune', 'ran'), ('export', 'ran')]
"""
import contextlib
import dataclasses
import difflib
import fcntl
import logging
import os
import shutil
import time
import traceback

from keras_llm.artifacts import METADATA_FILE, package_versions, read_json
from keras_llm.config import read_config_file
from keras_llm.errors import ArtifactError, ConfigError, KerasLLMError
from keras_llm.pipeline.metadata import (
    DATABASE_FILE,
    MetadataStore,
    fingerprint_directory,
    fingerprint_json,
)

logger = logging.getLogger(__name__)

PIPELINE_KEYS = ("name", "description", "root", "components")
NODE_KEYS = ("id", "component", "inputs", "parameters")


class ComponentFailed(KerasLLMError):
    """A component's executor raised; the run stopped there."""

    def __init__(self, message, node, execution_id):
        super().__init__(message)
        self.node = node
        self.execution_id = execution_id


@dataclasses.dataclass
class InputRef:
    """Where an input comes from: an earlier node's output, or an existing directory."""

    node: str = None
    output: str = None
    uri: str = None


@dataclasses.dataclass
class Node:
    id: str
    component: object
    inputs: dict
    parameters: dict


@dataclasses.dataclass
class Pipeline:
    name: str
    root: str
    nodes: list
    where: str


@dataclasses.dataclass
class NodeResult:
    """What happened to one node: status is `ran`, `cached` or `failed`."""

    node: str
    status: str
    execution_id: int
    outputs: dict
    seconds: float
    error: str = None


# ---------------------------------------------------------------------------- loading


def load_pipeline(name_or_path, components=None, root=None):
    """Reads and validates a pipeline config (a path, or the name of a shipped one).

    Args:
        components: `{name: Component}`; default: `keras_llm.components.COMPONENTS`.
        root: overrides the config's `root`.
    """
    if components is None:
        from keras_llm.components import COMPONENTS as components
    values, where = read_config_file(name_or_path)
    for key in values:
        if key not in PIPELINE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, PIPELINE_KEYS)}")
    name = values.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string, got {name!r}")
    root = root or values.get("root") or os.path.join("runs", name)
    if not isinstance(root, str):
        raise ConfigError(f"{where}: root must be a directory path, got {root!r}")
    entries = values.get("components")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: components must be a non-empty list of components")
    nodes = []
    for index, entry in enumerate(entries):
        nodes.append(_load_node(entry, f"components[{index}]", where, components, nodes))
    return Pipeline(name=name, root=os.path.abspath(root), nodes=nodes, where=where)


def _did_you_mean(key, choices):
    close = difflib.get_close_matches(str(key), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_node(entry, key, where, components, earlier):
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: {key} must be a mapping with a 'component' key")
    for field in entry:
        if field not in NODE_KEYS:
            raise ConfigError(f"{where}: unknown key {key}.{field}"
                              f"{_did_you_mean(field, NODE_KEYS)}")
    name = entry.get("component")
    if name not in components:
        raise ConfigError(f"{where}: {key}.component must be one of "
                          f"{', '.join(components)}; got {name!r}")
    component = components[name]
    node_id = entry.get("id", name)
    if not isinstance(node_id, str) or not node_id.replace("-", "_").isidentifier():
        raise ConfigError(f"{where}: {key}.id must be a name of letters, digits, _ and -; "
                          f"got {node_id!r}")
    if node_id in {n.id for n in earlier}:
        raise ConfigError(f"{where}: {key}.id {node_id!r} is used twice; give each "
                          f"component a unique id")
    inputs = _load_inputs(entry.get("inputs"), f"{key}.inputs", where, component, earlier)
    parameters = component.check_parameters(entry.get("parameters"), where,
                                            f"{key}.parameters")
    return Node(id=node_id, component=component, inputs=inputs, parameters=parameters)


def _load_inputs(values, key, where, component, earlier):
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {key} must be a mapping of input names to sources")
    for name in values:
        if name not in component.inputs:
            raise ConfigError(
                f"{where}: unknown input {key}.{name} of component {component.name!r}"
                f"{_did_you_mean(name, component.inputs)}; it takes "
                f"{', '.join(component.inputs) or 'no inputs'}")
    nodes = {n.id: n for n in earlier}
    inputs = {}
    for name in component.inputs:
        source = values.get(name)
        accepted = component.accepted_types(name)
        if source is None:
            raise ConfigError(f"{where}: {key}.{name} is required: an earlier component's "
                              f"output (<id>.<output>) or {{uri: DIR}} of type "
                              f"{' or '.join(accepted)}")
        if isinstance(source, dict) and set(source) == {"uri"} and isinstance(source["uri"],
                                                                               str):
            inputs[name] = InputRef(uri=os.path.abspath(source["uri"]))
            continue
        node_id, _, output = source.partition(".") if isinstance(source, str) else ("", "", "")
        if node_id not in nodes:
            raise ConfigError(f"{where}: {key}.{name}: {source!r} names no earlier component "
                              f"(expected <id>.<output> with id one of "
                              f"{', '.join(nodes) or 'none'}, or {{uri: DIR}})")
        upstream = nodes[node_id].component
        if output not in upstream.outputs:
            raise ConfigError(f"{where}: {key}.{name}: component {node_id!r} has no output "
                              f"{output!r} (it has {', '.join(upstream.outputs)})")
        if upstream.outputs[output] not in accepted:
            raise ConfigError(f"{where}: {key}.{name} accepts {' or '.join(accepted)} but "
                              f"{source} is a {upstream.outputs[output]}")
        inputs[name] = InputRef(node=node_id, output=output)
    return inputs


# ---------------------------------------------------------------------------- running


def run_pipeline(pipeline, components=None, root=None, report=None):
    """Runs every node in order; returns their `NodeResult`s.

    Args:
        pipeline: a `Pipeline`, or a config path/name for `load_pipeline`.
        report: called with each `NodeResult` as soon as it is known (the CLI prints it).

    Raises:
        ComponentFailed: a component failed; its error is recorded and earlier outputs stay.
    """
    if not isinstance(pipeline, Pipeline):
        pipeline = load_pipeline(pipeline, components=components, root=root)
    with _exclusive(pipeline.root):
        return _run_nodes(pipeline, report)


@contextlib.contextmanager
def _exclusive(root):
    """Holds `ROOT/.lock` so two runs never share a root (each would take the other's
    running executions for abandoned ones)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"{root}: another pipeline run is using this root; wait for "
                                f"it to finish")
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_nodes(pipeline, report):
    store = MetadataStore(os.path.join(pipeline.root, DATABASE_FILE))
    try:
        if store.abandon_running(pipeline.name):
            logger.warning("marked executions of a run that ended abruptly as failed")
        produced, results = {}, []
        for node in pipeline.nodes:
            try:
                result = _run_node(store, pipeline, node, produced)
            except ComponentFailed as e:
                result = NodeResult(node.id, "failed", e.execution_id, {}, 0.0, str(e))
                if report:
                    report(result)
                raise
            results.append(result)
            if report:
                report(result)
        return results
    finally:
        store.close()


def _run_node(store, pipeline, node, produced):
    component = node.component
    inputs = {name: _input_artifact(store, node, name, ref, produced)
              for name, ref in node.inputs.items()}
    parameters_json = {name: _to_json(value) for name, value in node.parameters.items()}
    parameter_fingerprint = fingerprint_json({"component": component.name,
                                              "executor": component.executor_name,
                                              "parameters": parameters_json})
    input_fingerprints = {name: artifact["fingerprint"] for name, artifact in inputs.items()}
    record = dict(pipeline=pipeline.name, node=node.id, component=component.name,
                  executor=component.executor_name, parameters=parameters_json,
                  parameter_fingerprint=parameter_fingerprint,
                  input_fingerprints=input_fingerprints, versions=package_versions())
    input_ids = {name: artifact["id"] for name, artifact in inputs.items()}

    for earlier in store.find_cached(pipeline.name, node.id, parameter_fingerprint,
                                     input_fingerprints):
        outputs = store.events(earlier["id"], "output")
        if set(outputs) == set(component.outputs) and all(
                _unchanged(artifact) for artifact in outputs.values()):
            execution_id = store.start_execution(**record)
            store.add_events(execution_id, "input", input_ids)
            store.finish_execution(execution_id, "cached",
                                   outputs={n: a["id"] for n, a in outputs.items()})
            produced.update({(node.id, n): a for n, a in outputs.items()})
            logger.debug("%s: cache hit (execution %d)", node.id, earlier["id"])
            return NodeResult(node.id, "cached", earlier["id"],
                              {n: a["uri"] for n, a in outputs.items()}, 0.0)

    execution_id = store.start_execution(**record)
    store.add_events(execution_id, "input", input_ids)
    output_uris = {name: os.path.join(pipeline.root, node.id, name, str(execution_id))
                   for name in component.outputs}
    arguments = {**{name: artifact["uri"] for name, artifact in inputs.items()},
                 **output_uris, **node.parameters}
    started = time.time()
    try:
        executor = component.resolve_executor(arguments)
        for uri in output_uris.values():
            if os.path.exists(uri):  # left by a store that was deleted: not a recorded artifact
                shutil.rmtree(uri)
            os.makedirs(uri)
        logger.info("%s: running %s (execution %d)", node.id, component.executor_name,
                    execution_id)
        executor(**arguments)
        empty = [name for name, uri in output_uris.items() if not os.listdir(uri)]
        if empty:
            raise ArtifactError(f"the executor wrote nothing to output {empty[0]!r}")
    except BaseException as e:
        error = f"{type(e).__name__}: {_first_line(e)}"
        store.finish_execution(execution_id, "failed", error=error,
                               traceback=traceback.format_exc())
        if not isinstance(e, Exception):
            raise
        raise ComponentFailed(
            f"component {node.id!r} failed (execution {execution_id}): {error}. Outputs of "
            f"earlier components are kept; a rerun continues from {node.id!r}",
            node.id, execution_id) from e
    output_ids = {}
    for name, uri in output_uris.items():
        fingerprint, files, size = fingerprint_directory(uri)
        output_ids[name] = store.put_artifact(component.outputs[name], uri, fingerprint,
                                              {"node": node.id, "output": name,
                                               "files": files, "bytes": size})
        produced[(node.id, name)] = store.artifact(output_ids[name])
    store.finish_execution(execution_id, "complete", outputs=output_ids)
    return NodeResult(node.id, "ran", execution_id, output_uris, round(time.time() - started, 3))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _to_json(value):
    from keras_llm.components.base import parameter_to_json

    return parameter_to_json(value)


def _unchanged(artifact):
    found = fingerprint_directory(artifact["uri"])
    return found is not None and found[0] == artifact["fingerprint"]


def _input_artifact(store, node, name, ref, produced):
    if ref.node is not None:
        return produced[(ref.node, ref.output)]
    found = fingerprint_directory(ref.uri)
    if found is None:
        raise ComponentFailed(f"component {node.id!r}: input {name} {ref.uri} is not a "
                              f"directory", node.id, None)
    accepted = node.component.accepted_types(name)
    metadata_path = os.path.join(ref.uri, METADATA_FILE)
    artifact_type = accepted[0]
    if os.path.isfile(metadata_path):
        artifact_type = read_json(metadata_path).get("artifact_type", artifact_type)
        if artifact_type not in accepted:
            raise ComponentFailed(f"component {node.id!r}: input {name} {ref.uri} is a "
                                  f"{artifact_type}, expected {' or '.join(accepted)}",
                                  node.id, None)
    fingerprint, files, size = found
    artifact_id = store.put_artifact(artifact_type, ref.uri, fingerprint,
                                     {"external": True, "files": files, "bytes": size})
    return store.artifact(artifact_id)


# ---------------------------------------------------------------------------- lineage


def find_store(path):
    """The metadata store of the pipeline root at or above `path`."""
    directory = os.path.abspath(path)
    while True:
        candidate = os.path.join(directory, DATABASE_FILE)
        if os.path.isfile(candidate):
            return MetadataStore(candidate)
        parent = os.path.dirname(directory)
        if parent == directory:
            raise ArtifactError(f"{path}: no {DATABASE_FILE} in it or above it; pass the "
                                f"pipeline root with --root")
        directory = parent


def lineage(artifact_uri, root=None):
    """What produced an artifact, from what, recursively.

    Returns `{"artifact": record, "produced_by": None | {"execution": record,
    "inputs": {name: <the same structure>}}}`; an artifact that came from outside the
    pipeline has `produced_by: None`. A path inside an artifact directory finds it too.
    """
    store = MetadataStore(os.path.join(root, DATABASE_FILE)) if root else \
        find_store(artifact_uri)
    try:
        candidate = os.path.abspath(artifact_uri)
        while True:
            records = store.artifacts_at(candidate)
            if records:
                return _trace(store, records[0])
            parent = os.path.dirname(candidate)
            if parent == candidate:
                raise ArtifactError(f"{artifact_uri}: not an artifact recorded in {store.path}")
            candidate = parent
    finally:
        store.close()


def _trace(store, artifact):
    execution = store.producer(artifact["id"])
    if execution is None:
        return {"artifact": artifact, "produced_by": None}
    inputs = store.events(execution["id"], "input")
    return {"artifact": artifact,
            "produced_by": {"execution": execution,
                            "inputs": {name: _trace(store, a) for name, a in inputs.items()}}}


def lineage_chain(tree):
    """The executions in a lineage tree, producers first (a topological order)."""
    chain = []

    def visit(node):
        produced_by = node["produced_by"]
        if produced_by is None:
            return
        for child in produced_by["inputs"].values():
            visit(child)
        if produced_by["execution"]["id"] not in {e["id"] for e in chain}:
            chain.append(produced_by["execution"])

    visit(tree)
    return chain


def describe_lineage(tree, indent=""):
    """A lineage tree as indented text lines, the artifact first, then what made it."""
    artifact = tree["artifact"]
    lines = [f"{indent}{artifact['type']} {artifact['uri']} (fingerprint "
             f"{artifact['fingerprint']})"]
    produced_by = tree["produced_by"]
    if produced_by is None:
        lines.append(f"{indent}  <- from outside the pipeline")
        return lines
    execution = produced_by["execution"]
    parameters = ", ".join(f"{k}={_short(v)}" for k, v in execution["parameters"].items())
    lines.append(f"{indent}  <- {execution['node']} (component {execution['component']}, "
                 f"execution {execution['id']}, {execution['status']} {execution['ended']}) "
                 f"parameters: {parameters or 'none'}")
    for name, child in produced_by["inputs"].items():
        lines.append(f"{indent}     {name}:")
        lines.extend(describe_lineage(child, indent + "       "))
    return lines


def _short(value):
    if isinstance(value, dict) and "model" in value and "name" in value:
        return f"<config {value['name']}, fingerprint {fingerprint_json(value)}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
