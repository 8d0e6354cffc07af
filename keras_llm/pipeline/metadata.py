"""The pipeline's metadata store: artifacts, executions and the events linking them, in
SQLite (`PIPELINE_ROOT/metadata.sqlite`), after ML Metadata's data model as TFX uses it.

    artifacts   a directory: type, uri, content fingerprint, properties
    executions  one run of a component: parameters and their fingerprint, the fingerprints
                of its inputs, status (running, complete, failed, cached), error, package
                versions, start and end times
    events      execution -> artifact, kind `input` or `output`, with the input/output name

Lineage follows events backwards: an artifact's producer is the complete execution with an
`output` event to it, whose `input` events name the artifacts it was made from.

Example:

>>> store = MetadataStore(":memory:")
>>> run = store.start_execution("demo", "step", "step", {"n": 1}, "p1", {}, {})
>>> art = store.put_artifact("example.Text", "/tmp/text", "f1", {})
>>> store.finish_execution(run, "complete", outputs={"output_dir": art})
>>> store.producer(art)["id"] == run
True
"""
import datetime
import hashlib
import json
import os
import sqlite3
import threading

DATABASE_FILE = "metadata.sqlite"
STATUSES = ("running", "complete", "failed", "cached")

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    uri TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    properties TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_uri ON artifacts (uri);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL,
    node TEXT NOT NULL,
    component TEXT NOT NULL,
    executor TEXT NOT NULL,
    parameters TEXT NOT NULL,
    parameter_fingerprint TEXT NOT NULL,
    input_fingerprints TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed', 'cached')),
    error TEXT,
    traceback TEXT,
    versions TEXT NOT NULL,
    started TEXT NOT NULL,
    ended TEXT
);
CREATE INDEX IF NOT EXISTS executions_cache
    ON executions (pipeline, node, parameter_fingerprint, status);
CREATE TABLE IF NOT EXISTS events (
    execution_id INTEGER NOT NULL REFERENCES executions (id),
    artifact_id INTEGER NOT NULL REFERENCES artifacts (id),
    kind TEXT NOT NULL CHECK (kind IN ('input', 'output')),
    name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_artifact ON events (artifact_id, kind);
CREATE INDEX IF NOT EXISTS events_execution ON events (execution_id, kind);
"""


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def fingerprint_json(value):
    """A stable hash of JSON data (parameters, input fingerprint maps)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint_directory(path):
    """A hash of a directory's content: every file's relative path and bytes, in sorted
    order (names starting with '.' are skipped: temporary files of atomic writes).

    Returns `(fingerprint, number_of_files, total_bytes)`; `None` for a missing directory.
    """
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    files = total = 0
    for directory, subdirs, names in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            full = os.path.join(directory, name)
            digest.update(os.path.relpath(full, path).replace(os.sep, "/").encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    total += len(block)
            digest.update(b"\0")
            files += 1
    return digest.hexdigest()[:16], files, total


class MetadataStore:
    """Reads and writes the metadata database; safe to share between threads."""

    def __init__(self, path):
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._db:
            self._db.executescript(SCHEMA)

    def close(self):
        self._db.close()

    def _write(self, sql, parameters=()):
        with self._lock, self._db:
            return self._db.execute(sql, parameters).lastrowid

    def _read(self, sql, parameters=()):
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, parameters)]

    # ------------------------------------------------------------------ artifacts

    def put_artifact(self, artifact_type, uri, fingerprint, properties):
        """Records an artifact (or returns the id of the identical record) -> id."""
        uri = os.path.abspath(uri) if "://" not in uri else uri
        existing = self._read(
            "SELECT id FROM artifacts WHERE uri = ? AND type = ? AND fingerprint = ? "
            "ORDER BY id DESC LIMIT 1", (uri, artifact_type, fingerprint))
        if existing:
            return existing[0]["id"]
        return self._write(
            "INSERT INTO artifacts (type, uri, fingerprint, properties, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (artifact_type, uri, fingerprint, json.dumps(properties, sort_keys=True), now()))

    def artifact(self, artifact_id):
        rows = self._read("SELECT * FROM artifacts WHERE id = ?", (artifact_id,))
        return _decode(rows[0]) if rows else None

    def artifacts_at(self, uri):
        """The records of `uri`, newest first."""
        rows = self._read("SELECT * FROM artifacts WHERE uri = ? ORDER BY id DESC",
                          (os.path.abspath(uri),))
        return [_decode(row) for row in rows]

    # ------------------------------------------------------------------ executions

    def start_execution(self, pipeline, node, component, parameters, parameter_fingerprint,
                        input_fingerprints, versions, executor="", status="running"):
        return self._write(
            "INSERT INTO executions (pipeline, node, component, executor, parameters, "
            "parameter_fingerprint, input_fingerprints, status, versions, started) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pipeline, node, component, executor, json.dumps(parameters, sort_keys=True),
             parameter_fingerprint, json.dumps(input_fingerprints, sort_keys=True), status,
             json.dumps(versions, sort_keys=True), now()))

    def add_events(self, execution_id, kind, artifacts):
        """Links `{name: artifact_id}` to an execution as its inputs or outputs."""
        for name, artifact_id in artifacts.items():
            self._write("INSERT INTO events (execution_id, artifact_id, kind, name) "
                        "VALUES (?, ?, ?, ?)", (execution_id, artifact_id, kind, name))

    def finish_execution(self, execution_id, status, outputs=None, error=None, traceback=None):
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {STATUSES[1:]}, got {status!r}")
        self.add_events(execution_id, "output", outputs or {})
        self._write("UPDATE executions SET status = ?, error = ?, traceback = ?, ended = ? "
                    "WHERE id = ?", (status, error, traceback, now(), execution_id))

    def abandon_running(self, pipeline):
        """Marks executions left `running` by a process that died as failed; -> count."""
        running = self._read("SELECT id FROM executions WHERE pipeline = ? AND "
                             "status = 'running'", (pipeline,))
        for row in running:
            self.finish_execution(row["id"], "failed",
                                  error="interrupted: the process ended while it ran")
        return len(running)

    def execution(self, execution_id):
        rows = self._read("SELECT * FROM executions WHERE id = ?", (execution_id,))
        return _decode(rows[0]) if rows else None

    def executions(self, pipeline=None, node=None):
        """Executions, oldest first, optionally of one pipeline and node."""
        sql, parameters = "SELECT * FROM executions WHERE 1 = 1", []
        for column, value in (("pipeline", pipeline), ("node", node)):
            if value is not None:
                sql += f" AND {column} = ?"
                parameters.append(value)
        return [_decode(row) for row in self._read(sql + " ORDER BY id", parameters)]

    def events(self, execution_id, kind):
        """`{name: artifact record}` of an execution's inputs or outputs."""
        rows = self._read("SELECT name, artifact_id FROM events WHERE execution_id = ? AND "
                          "kind = ? ORDER BY name", (execution_id, kind))
        return {row["name"]: self.artifact(row["artifact_id"]) for row in rows}

    def find_cached(self, pipeline, node, parameter_fingerprint, input_fingerprints):
        """Complete executions (newest first) of `node` with these parameters and inputs."""
        rows = self._read(
            "SELECT * FROM executions WHERE pipeline = ? AND node = ? AND "
            "parameter_fingerprint = ? AND input_fingerprints = ? AND status = 'complete' "
            "ORDER BY id DESC",
            (pipeline, node, parameter_fingerprint,
             json.dumps(input_fingerprints, sort_keys=True)))
        return [_decode(row) for row in rows]

    def producer(self, artifact_id):
        """The complete execution that wrote an artifact, or None (an external input)."""
        rows = self._read(
            "SELECT executions.* FROM events JOIN executions ON executions.id = "
            "events.execution_id WHERE events.artifact_id = ? AND events.kind = 'output' AND "
            "executions.status = 'complete' ORDER BY executions.id LIMIT 1", (artifact_id,))
        return _decode(rows[0]) if rows else None


def _decode(row):
    for key in ("properties", "parameters", "input_fingerprints", "versions"):
        if key in row and row[key] is not None:
            row[key] = json.loads(row[key])
    return row
