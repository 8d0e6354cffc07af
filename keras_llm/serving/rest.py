"""A local server that speaks TensorFlow Serving's REST API, for trying an export.

It serves the SavedModels under `EXPORT_BASE/<version>/` (TF Serving's layout) with the
same URLs, JSON bodies and error shapes as `tensorflow_model_server --rest_api_port`, so
requests written against it work unchanged against a real TF Serving:

    GET  /v1/models/NAME[/versions/V]           model status
    GET  /v1/models/NAME[/versions/V]/metadata  signature defs
    POST /v1/models/NAME[/versions/V]:predict   {"instances": [...]} or {"inputs": ...}

The newest numeric version is the default; a background thread polls `EXPORT_BASE` and
switches to a newer version once it has loaded. An older version on disk is served when a
request names it. Every version is loaded once (`tf.saved_model.load`), under a lock, and
then shared by all request threads. Only the standard library and TensorFlow are used.

Reference: https://www.tensorflow.org/tfx/serving/api_rest

Example:

>>> server = make_server("exports/classifier", port=0)           # doctest: +SKIP
>>> threading.Thread(target=server.serve_forever, daemon=True).start()  # doctest: +SKIP
>>> server.url                                                    # doctest: +SKIP
'http://127.0.0.1:40123/v1/models/classifier'
"""
import base64
import http.server
import json
import logging
import os
import re
import threading

from keras_llm.errors import ArtifactError

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
# Canonical error codes and the HTTP statuses TF Serving maps them to.
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
               "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNKNOWN": 500}
URL_PATTERN = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:/(?P<metadata>metadata)|:(?P<verb>[a-z]+))?$")


class ServingError(Exception):
    """A request failure with a canonical error code (`INVALID_ARGUMENT`, `NOT_FOUND`, ...)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.http_status = HTTP_STATUS.get(code, 500)


def _invalid(message):
    return ServingError("INVALID_ARGUMENT", message)


# ---------------------------------------------------------------------------- versions


class LoadedVersion:
    """One loaded SavedModel version: its signatures and their SignatureDef descriptions."""

    def __init__(self, version, path):
        import tensorflow as tf

        self.version = version
        self.path = path
        import tensorflow_text  # noqa: F401  (registers the tokenizer ops exports use)

        self.saved_model = tf.saved_model.load(path)
        self.signatures = dict(self.saved_model.signatures)
        self.signature_defs = read_signature_defs(path)

    def signature(self, name):
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise _invalid(f'Serving signature name: "{name}" not found in signature def')
        return self.signatures[name]


def read_signature_defs(path):
    """The SignatureDefs of a SavedModel as TF Serving's metadata JSON shows them."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    defs = saved_model.meta_graphs[0].signature_def
    return {name: json_format.MessageToDict(
                defs[name], always_print_fields_with_no_presence=True,
                preserving_proto_field_name=True)
            for name in sorted(defs) if not name.startswith("__")}


def version_dirs(export_base):
    """`{version: path}` for the finished versions under `export_base` (numeric dirs holding
    a `saved_model.pb`; a version still being written is skipped until it is complete)."""
    found = {}
    for entry in os.listdir(export_base):
        path = os.path.join(export_base, entry)
        if entry.isdigit() and os.path.isfile(os.path.join(path, "saved_model.pb")):
            found[int(entry)] = path
    return found


class ModelVersions:
    """The versions of one model: loads each version once, tracks the newest.

    Thread-safe: request threads and the poller share it. Loading holds `_load_lock`, so
    two requests for the same unloaded version load it once; reading what is loaded never
    waits on a load in progress.
    """

    def __init__(self, name, export_base):
        self.name = name
        self.export_base = export_base
        self.latest = None
        self._loaded = {}
        self._failed = {}
        self._failed_snapshot = {}
        self._load_lock = threading.Lock()

    def refresh(self):
        """Loads the newest version on disk if it is newer than the one being served."""
        versions = version_dirs(self.export_base)
        if not versions:
            return
        newest = max(versions)
        if self.latest is None or newest > self.latest.version:
            loaded = self._load(newest, versions[newest])
            if loaded is not None:
                self.latest = loaded
                logger.info("serving %s version %d from %s", self.name, newest, loaded.path)

    def get(self, version=None):
        """The latest version, or `version` (loaded on first use); `NOT_FOUND` otherwise."""
        if version is None:
            if self.latest is None:
                raise ServingError("NOT_FOUND",
                                   f"Servable not found for request: Latest({self.name})")
            return self.latest
        loaded = self._loaded.get(version)
        if loaded is not None:
            return loaded
        path = version_dirs(self.export_base).get(version)
        loaded = self._load(version, path) if path else None
        if loaded is None:
            raise ServingError(
                "NOT_FOUND", f"Servable not found for request: Specific({self.name}, {version})")
        return loaded

    def status(self, version=None):
        """TF Serving's `model_version_status` list: loaded versions AVAILABLE, failed END."""
        if version is not None:
            try:
                self.get(version)
            except ServingError:
                if version not in self._failed:
                    raise ServingError(
                        "NOT_FOUND", f"Could not find version {version} of model {self.name}")
            versions = [version]
        else:
            versions = sorted(set(self._loaded) | set(self._failed), reverse=True)
            if not versions:
                raise ServingError("NOT_FOUND",
                                   f"Could not find any versions of model {self.name}")
        return [_version_status(v, self._failed.get(v) if v not in self._loaded else None)
                for v in versions]

    def _load(self, version, path):
        """The loaded version, or None if it fails (not retried until its files change)."""
        with self._load_lock:
            if version in self._loaded:
                return self._loaded[version]
            if version in self._failed and _snapshot(path) == self._failed_snapshot[version]:
                return None
            try:
                loaded = LoadedVersion(version, path)
            except Exception as e:  # a broken export must not take the server down
                if version not in self._failed:
                    logger.warning("could not load %s version %d: %s", self.name, version, e)
                self._failed[version] = f"{type(e).__name__}: {str(e).strip()[:500]}"
                self._failed_snapshot[version] = _snapshot(path)
                return None
            self._failed.pop(version, None)
            self._loaded[version] = loaded
            return loaded


def _snapshot(path):
    """Names, sizes and times of a version's files: a failed load is retried once they
    change (an exporter may still have been writing)."""
    found = []
    for directory, _, names in os.walk(path):
        for name in names:
            try:
                stat = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            found.append((os.path.join(directory, name), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


def _version_status(version, error):
    return {"version": str(version), "state": "END" if error else "AVAILABLE",
            "status": {"error_code": "UNKNOWN" if error else "OK",
                       "error_message": error or ""}}


# ---------------------------------------------------------------------------- predict


def predict(loaded, body, max_batch_size=None):
    """Runs a TF Serving predict request body (a dict) on a loaded version.

    Row format `{"instances": [...]}` answers `{"predictions": [...]}`; columnar format
    `{"inputs": ...}` answers `{"outputs": ...}`. With one input a row may be the bare value
    and `inputs` the bare batch; with one output `predictions`/`outputs` hold the bare value.
    """
    if not isinstance(body, dict):
        raise _invalid("JSON Value is not an object: expected {\"instances\": ...} "
                       "or {\"inputs\": ...}")
    if ("instances" in body) == ("inputs" in body):
        raise _invalid("Missing 'inputs' or 'instances' key" if "inputs" not in body else
                       "Not both 'instances' and 'inputs' can be specified in one request")
    signature_name = body.get("signature_name") or DEFAULT_SIGNATURE
    function = loaded.signature(signature_name)
    specs = function.structured_input_signature[1]
    row_format = "instances" in body
    if row_format:
        columns, batch_size = _columns_from_instances(body["instances"], specs)
    else:
        columns, batch_size = _columns_from_inputs(body["inputs"], specs)
    if max_batch_size is not None and batch_size is not None and batch_size > max_batch_size:
        raise _invalid(f"Task size {batch_size} is larger than maximum input batch size "
                       f"{max_batch_size}")
    tensors = {name: _to_tensor(name, value, specs[name]) for name, value in columns.items()}
    outputs = _call(function, tensors)
    if row_format:
        return {"predictions": _rows(outputs, batch_size)}
    values = {name: _to_json(name, tensor.numpy()) for name, tensor in outputs.items()}
    return {"outputs": next(iter(values.values())) if len(values) == 1 else values}


def _check_names(names, specs, where):
    unknown = sorted(set(names) - set(specs))
    missing = sorted(set(specs) - set(names))
    expected = "{" + ", ".join(sorted(specs)) + "}"
    if unknown:
        raise _invalid(f"{where}input tensor alias not found in signature: {unknown[0]}. "
                       f"Inputs expected to be in the set {expected}.")
    if missing:
        raise _invalid(f"{where}missing input: {missing[0]}. Inputs expected to be in the "
                       f"set {expected}.")


def _is_named(value):
    return isinstance(value, dict) and set(value) != {"b64"}


def _columns_from_instances(instances, specs):
    if not isinstance(instances, list) or not instances:
        raise _invalid("'instances' must be a non-empty JSON list")
    columns = {name: [] for name in specs}
    for index, instance in enumerate(instances):
        where = f"Failed to process element: {index} of 'instances' list. Error: "
        if _is_named(instance):
            _check_names(instance, specs, where)
            for name, value in instance.items():
                columns[name].append(value)
        elif len(specs) == 1:
            columns[next(iter(specs))].append(instance)
        else:
            raise _invalid(f"{where}expected a JSON object with named inputs "
                           f"{{{', '.join(sorted(specs))}}}, got {json.dumps(instance)[:80]}")
    return columns, len(instances)


def _columns_from_inputs(inputs, specs):
    if _is_named(inputs):
        _check_names(inputs, specs, "")
        columns = dict(inputs)
    elif len(specs) == 1:
        columns = {next(iter(specs)): inputs}
    else:
        raise _invalid(f"'inputs' must be a JSON object with named inputs "
                       f"{{{', '.join(sorted(specs))}}}")
    batch_sizes = {len(v) for v in columns.values() if isinstance(v, list)}
    return columns, max(batch_sizes) if batch_sizes else None


def _decode_strings(value, name):
    if isinstance(value, list):
        return [_decode_strings(v, name) for v in value]
    if isinstance(value, dict) and set(value) == {"b64"}:
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError):
            raise _invalid(f"input {name}: 'b64' value is not valid base64")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise _invalid(f"input {name}: expected a string or {{\"b64\": ...}}, got "
                   f"{json.dumps(value)[:40]}")


def _to_tensor(name, value, spec):
    import tensorflow as tf

    if spec.dtype == tf.string:
        value = _decode_strings(value, name)
    try:
        tensor = tf.constant(value, dtype=spec.dtype)
    except (TypeError, ValueError) as e:
        raise _invalid(f"input {name}: cannot convert to {spec.dtype.name}: "
                       f"{str(e).splitlines()[0]}")
    if not spec.shape.is_compatible_with(tensor.shape):
        raise _invalid(f"input {name}: shape {tensor.shape.as_list()} does not match the "
                       f"signature's {spec.shape}")
    return tensor


def _call(function, tensors):
    import tensorflow as tf

    try:
        outputs = function(**tensors)
    except tf.errors.InvalidArgumentError as e:
        raise _invalid(_op_error_line(e.message))
    except tf.errors.OpError as e:
        raise ServingError("INTERNAL", _op_error_line(e.message))
    return dict(sorted(outputs.items()))


def _op_error_line(message):
    """The line of a TF runtime error that says what went wrong: a graph's failed assertion
    ("assertion failed: [max_new_tokens must be ...]"), not "Graph execution error:" or the
    node trace around it."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("assertion failed:"):
            return line
    useful = [line for line in lines if line != "Graph execution error:" and not line.startswith(
        ("Detected at node", "File \"", "[[{{node"))]
    return (useful or lines or ["error"])[0]


def _to_json(name, array):
    """A numpy output as JSON values: strings as text, or base64 when the output name ends
    with `_bytes` or the bytes are not UTF-8 (TF Serving's rule for binary outputs)."""
    if array.dtype.kind in ("O", "S"):
        binary = name.endswith("_bytes")

        def convert(value):
            if isinstance(value, list):
                return [convert(v) for v in value]
            if not binary:
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(value).decode("ascii")}

        return convert(array.tolist())
    return array.tolist()


def _rows(outputs, batch_size):
    values = {}
    for name, tensor in outputs.items():
        array = tensor.numpy()
        if array.ndim == 0 or array.shape[0] != batch_size:
            size = array.shape[0] if array.ndim else 0
            raise _invalid(f"Tensor name: {name} has inconsistent batch size: {size} "
                           f"expecting: {batch_size}")
        values[name] = _to_json(name, array)
    if len(values) == 1:
        return next(iter(values.values()))
    return [{name: column[i] for name, column in values.items()} for i in range(batch_size)]


# ---------------------------------------------------------------------------- HTTP


class RestHandler(http.server.BaseHTTPRequestHandler):
    """Routes TF Serving's REST URLs; every failure is `{"error": "..."}` with its status."""

    protocol_version = "HTTP/1.1"
    server_version = "keras-llm-serve"

    def do_GET(self):
        self._respond(*self._handle("GET", None))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self._respond(*self._handle("POST", self.rfile.read(length)))

    def _handle(self, method, body):
        try:
            return 200, self._route(method, body)
        except ServingError as e:
            return e.http_status, {"error": str(e)}
        except Exception as e:  # the server keeps serving whatever one request does
            logger.exception("request %s %s failed", method, self.path)
            return 500, {"error": f"{type(e).__name__}: {e}"}

    def _route(self, method, body):
        match = URL_PATTERN.match(self.path.split("?", 1)[0])
        if not match or (match["version"] and not match["version"].isdigit()):
            raise _invalid(f"Malformed request: {method} {self.path}")
        if match["label"]:
            raise _invalid(f"Unrecognized servable version label: {match['label']}")
        verb, metadata = match["verb"], match["metadata"]
        if verb in ("classify", "regress"):
            raise ServingError("UNIMPLEMENTED", f"{verb} is not supported here; use :predict")
        if (method, verb) not in (("GET", None), ("POST", "predict")):
            raise _invalid(f"Malformed request: {method} {self.path}")
        server = self.server
        version = int(match["version"]) if match["version"] else None
        if match["name"] != server.model_name:
            request = f"Specific({match['name']}, {version})" if version is not None else \
                f"Latest({match['name']})"
            raise ServingError("NOT_FOUND", f"Servable not found for request: {request}")
        if method == "GET" and not metadata:
            return {"model_version_status": server.versions.status(version)}
        loaded = server.versions.get(version)
        if metadata:
            return {"model_spec": {"name": server.model_name, "signature_name": "",
                                   "version": str(loaded.version)},
                    "metadata": {"signature_def": {"signature_def": loaded.signature_defs}}}
        try:
            request = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise _invalid("JSON Parse error: request body is not UTF-8")
        except json.JSONDecodeError as e:
            raise _invalid(f"JSON Parse error: {e.msg} at offset: {e.pos}")
        return predict(loaded, request, server.max_batch_size)

    def _respond(self, status, payload):
        data = json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)


class ModelServer(http.server.ThreadingHTTPServer):
    """The HTTP server plus the model it serves and the thread that polls for versions."""

    daemon_threads = True

    def __init__(self, address, versions, max_batch_size=None, poll_seconds=1.0):
        super().__init__(address, RestHandler)
        self.versions = versions
        self.model_name = versions.name
        self.max_batch_size = max_batch_size
        self.poll_seconds = poll_seconds
        self._stop_polling = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="version-poller", daemon=True)
        self._poller.start()

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1/models/{self.model_name}"

    def _poll(self):
        while not self._stop_polling.wait(self.poll_seconds):
            try:
                self.versions.refresh()
            except OSError as e:
                logger.warning("cannot scan %s: %s", self.versions.export_base, e)

    def server_close(self):
        self._stop_polling.set()
        super().server_close()


def make_server(export_base, port=8501, host="127.0.0.1", model_name=None,
                max_batch_size=None, poll_seconds=1.0):
    """Loads the newest version under `export_base` and returns a bound, not yet running,
    `ModelServer` (call `serve_forever()`; `port=0` picks a free port, see `server.url`).

    Args:
        export_base: directory of numeric version subdirectories (TF Serving's layout).
        port, host: where to listen; 127.0.0.1 by default, so nothing outside this machine
            can reach it.
        model_name: the NAME in `/v1/models/NAME`; default: the basename of `export_base`.
        max_batch_size: requests with a larger batch are refused (INVALID_ARGUMENT).
        poll_seconds: how often `export_base` is checked for a new version.
    """
    if not os.path.isdir(export_base):
        raise ArtifactError(f"{export_base}: no such export directory")
    name = model_name or os.path.basename(os.path.normpath(os.path.abspath(export_base)))
    versions = ModelVersions(name, export_base)
    versions.refresh()
    if versions.latest is None:
        logger.warning("no loadable version under %s yet; waiting for one", export_base)
    return ModelServer((host, port), versions, max_batch_size=max_batch_size,
                       poll_seconds=poll_seconds)


def serve(export_base, port=8501, host="127.0.0.1", model_name=None, max_batch_size=None,
          poll_seconds=1.0):
    """Serves `export_base` until interrupted (Ctrl-C)."""
    server = make_server(export_base, port=port, host=host, model_name=model_name,
                         max_batch_size=max_batch_size, poll_seconds=poll_seconds)
    logger.info("serving %s at %s", export_base, server.url)
    run_until_interrupted(server)


def run_until_interrupted(server):
    """Serves requests until Ctrl-C, then closes the listening socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
