"""The pipeline runner with fake executors: caching, reruns, failure and resume, lineage,
config validation, and the `keras-llm pipeline` commands."""
import os
import shutil

import pytest
import yaml
from click.testing import CliRunner

from keras_llm.components import COMPONENTS
from keras_llm.components.base import CONFIG, Component, Parameter
from keras_llm.errors import ArtifactError, ConfigError
from keras_llm.pipeline.metadata import DATABASE_FILE, MetadataStore
from keras_llm.pipeline.runner import (
    ComponentFailed,
    describe_lineage,
    lineage,
    lineage_chain,
    load_pipeline,
    run_pipeline,
)

CALLS = []
FAIL = set()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


def fake_pretrain(output_dir, steps, config=None):
    CALLS.append(("pretrain", steps))
    write(os.path.join(output_dir, "model.txt"), f"pretrained {steps} steps")


def fake_finetune(pretrained, output_dir, epochs, label_names):
    CALLS.append(("finetune", epochs))
    if "finetune" in FAIL:
        write(os.path.join(output_dir, "partial.txt"), "half done")
        raise ValueError("boom: the labels do not fit")
    write(os.path.join(output_dir, "model.txt"),
          f"{read(os.path.join(pretrained, 'model.txt'))} + {epochs} epochs on {label_names}")


def fake_export(model_dir, output):
    CALLS.append(("export", None))
    model = read(os.path.join(model_dir, "model.txt"))
    write(os.path.join(output, "1", "saved_model.pb"), f"export of {model}")


FAKES = {
    "fake_pretrain": Component("fake_pretrain", inputs={}, outputs={"output_dir": "t.Pretrained"},
                               parameters=[Parameter("steps", int, default=10, help="steps"),
                                           Parameter("config", CONFIG, default=None)],
                               executor=fake_pretrain),
    "fake_finetune": Component("fake_finetune", inputs={"pretrained": "t.Pretrained"},
                               outputs={"output_dir": "t.Finetuned"},
                               parameters=[Parameter("epochs", int, help="passes"),
                                           Parameter("label_names", list, default=["a", "b"])],
                               executor=fake_finetune),
    "fake_export": Component("fake_export", inputs={"model_dir": ("t.Finetuned", "t.Pretrained")},
                             outputs={"output": "t.Exported"}, parameters=[],
                             executor=fake_export),
    "missing": Component("missing", inputs={}, outputs={"output_dir": "t.X"}, parameters=[],
                         executor="keras_llm.no_such_module:run"),
}


@pytest.fixture(autouse=True)
def reset():
    CALLS.clear()
    FAIL.clear()


def pipeline_file(tmp_path, epochs=2, steps=10, **changes):
    values = {
        "name": "test",
        "root": str(tmp_path / "root"),
        "components": [
            {"id": "pretrain", "component": "fake_pretrain", "parameters": {"steps": steps}},
            {"id": "finetune", "component": "fake_finetune",
             "inputs": {"pretrained": "pretrain.output_dir"}, "parameters": {"epochs": epochs}},
            {"id": "export", "component": "fake_export",
             "inputs": {"model_dir": "finetune.output_dir"}},
        ],
    }
    values.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def run(path, **kwargs):
    return run_pipeline(path, components=FAKES, **kwargs)


def statuses(results):
    return [(r.node, r.status) for r in results]


def test_first_run_executes_and_records_everything(tmp_path):
    reported = []
    results = run(pipeline_file(tmp_path), report=reported.append)
    assert statuses(results) == [("pretrain", "ran"), ("finetune", "ran"), ("export", "ran")]
    assert reported == results
    assert CALLS == [("pretrain", 10), ("finetune", 2), ("export", None)]
    root = str(tmp_path / "root")
    assert results[0].outputs == {"output_dir": os.path.join(root, "pretrain", "output_dir", "1")}
    assert read(os.path.join(results[2].outputs["output"], "1", "saved_model.pb")) == \
        "export of pretrained 10 steps + 2 epochs on ['a', 'b']"

    store = MetadataStore(os.path.join(root, DATABASE_FILE))
    executions = store.executions(pipeline="test")
    assert [(e["node"], e["status"]) for e in executions] == [
        ("pretrain", "complete"), ("finetune", "complete"), ("export", "complete")]
    finetune = executions[1]
    assert finetune["parameters"] == {"epochs": 2, "label_names": ["a", "b"]}
    assert finetune["input_fingerprints"] == {
        "pretrained": store.events(executions[0]["id"], "output")["output_dir"]["fingerprint"]}
    assert finetune["versions"]["python"] and finetune["executor"].endswith(":fake_finetune")
    assert store.events(finetune["id"], "output")["output_dir"]["type"] == "t.Finetuned"


def test_rerun_is_all_cache_hits(tmp_path):
    path = pipeline_file(tmp_path)
    first = run(path)
    CALLS.clear()
    second = run(path)
    assert statuses(second) == [("pretrain", "cached"), ("finetune", "cached"),
                                ("export", "cached")]
    assert CALLS == []
    assert [r.outputs for r in second] == [r.outputs for r in first]
    assert [r.execution_id for r in second] == [r.execution_id for r in first]
    store = MetadataStore(str(tmp_path / "root" / DATABASE_FILE))
    assert [e["status"] for e in store.executions()][3:] == ["cached"] * 3


def test_changed_parameter_reruns_that_component_and_what_depends_on_it(tmp_path):
    run(pipeline_file(tmp_path, epochs=2))
    CALLS.clear()
    results = run(pipeline_file(tmp_path, epochs=3))
    assert statuses(results) == [("pretrain", "cached"), ("finetune", "ran"), ("export", "ran")]
    assert CALLS == [("finetune", 3), ("export", None)]
    CALLS.clear()
    # Back to the first parameters: that execution's outputs are still there.
    assert statuses(run(pipeline_file(tmp_path, epochs=2))) == [
        ("pretrain", "cached"), ("finetune", "cached"), ("export", "cached")]
    assert CALLS == []


def test_same_output_content_keeps_downstream_cached(tmp_path):
    run(pipeline_file(tmp_path))
    CALLS.clear()
    # A default made explicit changes nothing: same parameter fingerprint.
    path = pipeline_file(tmp_path)
    values = yaml.safe_load(open(path))
    values["components"][1]["parameters"]["label_names"] = ["a", "b"]
    open(path, "w").write(yaml.safe_dump(values))
    assert [r.status for r in run(path)] == ["cached"] * 3


def test_deleted_or_modified_output_is_rebuilt(tmp_path):
    first = run(pipeline_file(tmp_path))
    shutil.rmtree(first[0].outputs["output_dir"])
    CALLS.clear()
    results = run(pipeline_file(tmp_path))
    # pretrain reruns; its new output has the same content, so finetune is still cached.
    assert statuses(results) == [("pretrain", "ran"), ("finetune", "cached"),
                                 ("export", "cached")]
    write(os.path.join(results[1].outputs["output_dir"], "model.txt"), "tampered")
    CALLS.clear()
    assert statuses(run(pipeline_file(tmp_path))) == [
        ("pretrain", "cached"), ("finetune", "ran"), ("export", "cached")]


def test_failure_stops_keeps_earlier_artifacts_and_rerun_resumes(tmp_path):
    path = pipeline_file(tmp_path)
    FAIL.add("finetune")
    reported = []
    with pytest.raises(ComponentFailed) as failure:
        run(path, report=reported.append)
    message = str(failure.value)
    assert message.startswith("component 'finetune' failed (execution 2): ValueError: boom: "
                              "the labels do not fit.")
    assert "\n" not in message
    assert [(r.node, r.status) for r in reported] == [("pretrain", "ran"), ("finetune", "failed")]
    assert CALLS == [("pretrain", 10), ("finetune", 2)]  # export never ran
    assert read(os.path.join(reported[0].outputs["output_dir"], "model.txt")) == \
        "pretrained 10 steps"
    store = MetadataStore(str(tmp_path / "root" / DATABASE_FILE))
    failed = store.execution(2)
    assert (failed["node"], failed["status"]) == ("finetune", "failed")
    assert failed["error"] == "ValueError: boom: the labels do not fit"
    assert "Traceback" in failed["traceback"]
    assert store.events(2, "output") == {}  # a failed run's outputs are not artifacts

    FAIL.clear()
    CALLS.clear()
    results = run(path)
    assert statuses(results) == [("pretrain", "cached"), ("finetune", "ran"), ("export", "ran")]
    assert CALLS == [("finetune", 2), ("export", None)]


def test_missing_executor_is_a_clear_failure_of_that_component(tmp_path):
    path = pipeline_file(tmp_path, components=[
        {"id": "pretrain", "component": "fake_pretrain"},
        {"id": "later", "component": "missing"}])
    with pytest.raises(ComponentFailed, match=r"component 'later' failed \(execution 2\): "
                       r"ExecutorError: executor keras_llm.no_such_module:run is not available "
                       r"\(No module named 'keras_llm.no_such_module'\)"):
        run(path)
    assert CALLS == [("pretrain", 10)]


def test_executor_that_does_not_match_its_declaration(tmp_path):
    components = dict(FAKES, fake_pretrain=Component(
        "fake_pretrain", inputs={}, outputs={"output_dir": "t.Pretrained"},
        parameters=[Parameter("stepz", int, default=1)], executor=fake_pretrain))
    path = pipeline_file(tmp_path, components=[{"id": "p", "component": "fake_pretrain"}])
    with pytest.raises(ComponentFailed, match="does not match the declaration of component "
                       "'fake_pretrain'.*stepz"):
        run_pipeline(path, components=components)
    assert CALLS == []


def test_executor_that_writes_nothing_fails(tmp_path):
    components = dict(FAKES, fake_pretrain=Component(
        "fake_pretrain", inputs={}, outputs={"output_dir": "t.Pretrained"},
        parameters=[Parameter("steps", int)], executor=lambda output_dir, steps: None))
    path = pipeline_file(tmp_path, components=[{"component": "fake_pretrain",
                                                "parameters": {"steps": 1}}])
    with pytest.raises(ComponentFailed, match="wrote nothing to output 'output_dir'"):
        run_pipeline(path, components=components)


def test_config_parameters_are_resolved_and_fingerprinted(tmp_path):
    config = {"base": "gpt-tiny", "overrides": {"train.steps": 3}}
    path = pipeline_file(tmp_path, components=[
        {"component": "fake_pretrain", "parameters": {"config": config}}])
    pipeline = load_pipeline(path, components=FAKES)
    assert pipeline.nodes[0].parameters["config"].train.steps == 3
    run(path)
    store = MetadataStore(str(tmp_path / "root" / DATABASE_FILE))
    assert store.execution(1)["parameters"]["config"]["train"]["steps"] == 3
    config["overrides"]["train.steps"] = 4
    path = pipeline_file(tmp_path, components=[
        {"component": "fake_pretrain", "parameters": {"config": config}}])
    assert [r.status for r in run(path)] == ["ran"]


def test_lineage_traces_back_to_the_start(tmp_path):
    results = run(pipeline_file(tmp_path))
    exported = results[2].outputs["output"]
    tree = lineage(exported)
    assert tree["artifact"]["type"] == "t.Exported"
    assert [e["node"] for e in lineage_chain(tree)] == ["pretrain", "finetune", "export"]
    finetuned = tree["produced_by"]["inputs"]["model_dir"]
    assert finetuned["artifact"]["uri"] == results[1].outputs["output_dir"]
    assert finetuned["produced_by"]["execution"]["parameters"]["epochs"] == 2
    pretrained = finetuned["produced_by"]["inputs"]["pretrained"]
    assert pretrained["produced_by"]["inputs"] == {}
    # A file inside the artifact finds it too; cache hits do not change the producer.
    run(pipeline_file(tmp_path))
    assert lineage(os.path.join(exported, "1", "saved_model.pb")) == tree
    text = "\n".join(describe_lineage(tree))
    assert text.splitlines()[0].startswith(f"t.Exported {exported} (fingerprint ")
    assert "<- finetune (component fake_finetune, execution 2, complete" in text
    assert "parameters: epochs=2, label_names=['a', 'b']" in text


def test_external_input_artifact(tmp_path):
    model = tmp_path / "my-model"
    write(str(model / "model.txt"), "handmade")
    path = pipeline_file(tmp_path, components=[
        {"component": "fake_export", "inputs": {"model_dir": {"uri": str(model)}}}])
    (result,) = run(path)
    tree = lineage(result.outputs["output"])
    source = tree["produced_by"]["inputs"]["model_dir"]
    assert source["artifact"]["uri"] == str(model)
    assert source["artifact"]["type"] == "t.Finetuned"  # the first accepted type
    assert source["produced_by"] is None
    assert "from outside the pipeline" in "\n".join(describe_lineage(tree))
    assert run(path)[0].status == "cached"
    write(str(model / "model.txt"), "changed by hand")
    assert run(path)[0].status == "ran"


def test_lineage_of_unknown_paths(tmp_path):
    run(pipeline_file(tmp_path))
    with pytest.raises(ArtifactError, match="not an artifact recorded in"):
        lineage(str(tmp_path / "root"))
    with pytest.raises(ArtifactError, match="no metadata.sqlite in it or above it"):
        lineage(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"nmae": "x"}, "unknown key 'nmae' (did you mean 'name'?)"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"components": []}, "components must be a non-empty list"),
    ({"components": [{"component": "fake_pretrian"}]},
     "components[0].component must be one of fake_pretrain, fake_finetune, fake_export, "
     "missing; got 'fake_pretrian'"),
    ({"components": [{"component": "fake_pretrain", "parameter": {}}]},
     "unknown key components[0].parameter (did you mean 'parameters'?)"),
    ({"components": [{"component": "fake_pretrain", "parameters": {"step": 1}}]},
     "unknown parameter components[0].parameters.step of component 'fake_pretrain' "
     "(did you mean 'steps'?)"),
    ({"components": [{"component": "fake_pretrain", "parameters": {"steps": "many"}}]},
     "components[0].parameters.steps must be an integer, got 'many'"),
    ({"components": [{"component": "fake_pretrain", "parameters": {"config": "gpt-huge"}}]},
     "components[0].parameters.config: config 'gpt-huge' not found"),
    ({"components": [{"component": "fake_pretrain", "parameters": {
        "config": {"base": "gpt-tiny", "overrides": {"model.num_heads": 3}}}}]},
     "model.hidden_size (128) must be divisible by model.num_heads (3)"),
    ({"components": [{"component": "fake_pretrain"}, {
        "component": "fake_finetune", "inputs": {"pretrained": "fake_pretrain.output_dir"}}]},
     "components[1].parameters.epochs is required by component 'fake_finetune'"),
    ({"components": [{"component": "fake_finetune", "parameters": {"epochs": 1}}]},
     "components[0].inputs.pretrained is required"),
    ({"components": [{"component": "fake_finetune", "parameters": {"epochs": 1},
                      "inputs": {"pretrained": "later.output_dir"}},
                     {"id": "later", "component": "fake_pretrain"}]},
     "components[0].inputs.pretrained: 'later.output_dir' names no earlier component"),
    ({"components": [{"component": "fake_pretrain"},
                     {"component": "fake_export", "inputs": {"model_dir": "fake_pretrain.model"}}]},
     "component 'fake_pretrain' has no output 'model' (it has output_dir)"),
    ({"components": [{"component": "fake_pretrain"},
                     {"component": "fake_export", "inputs": {"modle_dir": "x.y"}}]},
     "unknown input components[1].inputs.modle_dir of component 'fake_export' "
     "(did you mean 'model_dir'?)"),
    ({"components": [{"component": "fake_pretrain"}, {"component": "fake_export", "inputs": {
        "model_dir": "fake_pretrain.output_dir"}}, {"component": "fake_finetune", "parameters": {
            "epochs": 1}, "inputs": {"pretrained": "fake_export.output"}}]},
     "components[2].inputs.pretrained accepts t.Pretrained but fake_export.output is a "
     "t.Exported"),
    ({"components": [{"component": "fake_pretrain"}, {"component": "fake_pretrain"}]},
     "components[1].id 'fake_pretrain' is used twice"),
])
def test_bad_pipeline_config_is_one_line_naming_the_key(tmp_path, change, message):
    path = pipeline_file(tmp_path, **change)
    with pytest.raises(ConfigError) as error:
        load_pipeline(path, components=FAKES)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "root")  # nothing ran


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ncomponents: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_pipeline(str(path), components=FAKES)


def test_shipped_tiny_pipeline_is_valid():
    pipeline = load_pipeline("pipeline-tiny", root="/tmp/unused")
    assert [n.id for n in pipeline.nodes] == ["pretrain", "finetune", "tune", "export"]
    assert pipeline.nodes[0].parameters["config"].train.steps == 30
    assert pipeline.nodes[3].inputs["model_dir"].node == "finetune"
    assert {n.component.executor for n in pipeline.nodes} == {
        "keras_llm.training.pretrain:pretrain", "keras_llm.pipeline.executors:finetune",
        "keras_llm.tuning:tune", "keras_llm.export:export"}


def test_pretrain_declaration_matches_its_executor():
    pretrain = COMPONENTS["pretrain"]
    try:
        import keras_llm.training.pretrain  # noqa: F401
    except ImportError as e:
        pytest.skip(f"keras_llm.training.pretrain does not import yet: {e}")
    pretrain.resolve_executor({"config": None, "output_dir": "x"})


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_every_declaration_matches_its_executor(name):
    # pipeline-tiny once failed at its finetune step: the declaration named
    # training.finetune:finetune, which takes a FinetuneOptions, not the parameters.
    component = COMPONENTS[name]
    arguments = {**{input_name: "in" for input_name in component.inputs},
                 **{output: "out" for output in component.outputs},
                 **{p.name: p.default for p in component.parameters}}
    component.resolve_executor(arguments)


def test_finetune_executor_passes_the_parameters_as_options(monkeypatch):
    from keras_llm.pipeline import executors
    from keras_llm.training import finetune as training

    calls = []
    monkeypatch.setattr(training, "finetune", lambda *args: calls.append(args) or {})
    parameters = {p.name: p.default for p in COMPONENTS["finetune"].parameters}
    executors.finetune(pretrained="runs/p", output_dir="runs/f",
                       **{**parameters, "epochs": 2, "max_length": 32})
    options, pretrained, output_dir = calls[0]
    assert (pretrained, output_dir) == ("runs/p", "runs/f")
    assert (options.epochs, options.max_seq_len, options.data) == (2, 32, "builtin")
    assert options.learning_rate == parameters["learning_rate"]


# ---------------------------------------------------------------------------- command line


@pytest.fixture
def fake_components(monkeypatch):
    for name, component in FAKES.items():
        monkeypatch.setitem(COMPONENTS, name, component)


def invoke(*args):
    from keras_llm.pipeline.cli import pipeline

    return CliRunner().invoke(pipeline, list(args))


def test_cli_run_rerun_and_lineage(tmp_path, fake_components):
    path = pipeline_file(tmp_path)
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"pipeline test: 3 components, root {tmp_path / 'root'}"
    assert lines[1].split()[:3] == ["pretrain", "ran", "(execution"]
    result = invoke("run", path)
    assert [line.split()[:2] for line in result.output.splitlines()[1:]] == [
        ["pretrain", "cached"], ["finetune", "cached"], ["export", "cached"]]
    exported = str(tmp_path / "root" / "export" / "output" / "3")
    result = invoke("lineage", exported)
    assert result.exit_code == 0
    assert result.output.startswith(f"t.Exported {exported}")
    assert "<- pretrain (component fake_pretrain, execution 1" in result.output
    result = invoke("lineage", "--json", exported)
    assert '"node": "finetune"' in result.output


def test_cli_errors_are_one_line(tmp_path, fake_components):
    result = invoke("run", pipeline_file(tmp_path, nmae="x"))
    assert result.exit_code == 2
    assert "unknown key 'nmae'" in result.output and "Traceback" not in result.output
    FAIL.add("finetune")
    result = invoke("run", pipeline_file(tmp_path))
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith(
        "Error: component 'finetune' failed (execution 2): ValueError: boom")
    assert "finetune     failed" in result.output


def test_two_runs_cannot_share_a_root(tmp_path):
    import fcntl

    root = tmp_path / "root"
    root.mkdir()
    with open(root / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ArtifactError, match="another pipeline run is using this root"):
            run(pipeline_file(tmp_path))
    assert CALLS == []
    assert [r.status for r in run(pipeline_file(tmp_path))] == ["ran"] * 3


@pytest.mark.slow
def test_real_pretrain_component_runs_and_caches(tmp_path):
    try:
        import keras_llm.training.pretrain  # noqa: F401
    except ImportError as e:
        pytest.skip(f"keras_llm.training.pretrain does not import yet: {e}")
    import json

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: the quick brown fox jumps "
                                                  f"over the lazy dog number {i % 7}."}) + "\n"
                              for i in range(200)))
    overrides = {"data.source": str(corpus), "model.vocab_size": 300, "model.max_length": 16,
                 "model.hidden_size": 16, "model.num_layers": 1, "model.num_heads": 2,
                 "model.intermediate_size": 32, "data.seq_len": 16, "train.batch_size": 4,
                 "train.steps": 3, "train.warmup_steps": 1, "train.eval_every": 3,
                 "train.eval_steps": 1}
    path = pipeline_file(tmp_path, components=[{"component": "pretrain", "parameters": {
        "config": {"base": "gpt-tiny", "overrides": overrides}}}])
    (result,) = run_pipeline(path)
    assert result.status == "ran"
    with open(os.path.join(result.outputs["output_dir"], "metadata.json")) as f:
        assert json.load(f)["artifact_type"] == "keras_llm.PretrainedModel"
    assert run_pipeline(path)[0].status == "cached"
