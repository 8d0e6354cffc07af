"""The built-in corpus: English docstrings of the installed Python standard library.

It needs no download, is the same on every machine with the same Python version, and is
real technical English, so the default `keras-llm pretrain` has something worth learning.
Docstrings are extracted with `ast` (no module is imported), in sorted file order, cleaned
with `inspect.cleandoc`, and cached as JSONL under `$KERAS_LLM_CACHE` (default
`~/.cache/keras_llm`). Each record holds the text, the module it came from and the name of
the documented object, which the built-in fine-tuning task uses as its label source.

Example:

>>> records = builtin_records()
>>> sorted(records[0])
['module', 'name', 'text']
"""
import ast
import hashlib
import inspect
import json
import logging
import os
import platform
import sysconfig

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
# Tests, demos and vendored or generated code are not the library's own prose.
EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
                  "ensurepip", "turtledemo", "__pycache__", "encodings", "pydoc_data"}
MIN_WORDS = 4


def cache_dir():
    return os.environ.get("KERAS_LLM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_llm")


def stdlib_files(root=None):
    """The standard library's Python files, sorted, with their dotted module names."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_PARTS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and not parts[-1].startswith(("test_", "_test")):
                found.append((".".join(parts), path))
    return sorted(found)


def is_english(text):
    ascii_letters = sum(c.isascii() and c.isalpha() for c in text)
    letters = sum(c.isalpha() for c in text)
    return letters > 0 and ascii_letters / letters > 0.97 and len(text.split()) >= MIN_WORDS


def module_docstrings(module, source):
    """(module, qualified name, cleaned docstring) for the module, its classes and functions."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    found.append((module, name, doc))
                visit(child, name + ".")

    doc = ast.get_docstring(tree, clean=True)
    if doc:
        found.append((module, "", doc))
    visit(tree, "")
    return found


def extract_records(root=None):
    records, seen = [], set()
    for module, path in stdlib_files(root):
        with open(path, "rb") as f:
            source = f.read()
        for module_name, name, doc in module_docstrings(module, source):
            text = inspect.cleandoc(doc)
            if is_english(text) and text not in seen:
                seen.add(text)
                records.append({"module": module_name, "name": name, "text": text})
    return records


def builtin_corpus_path():
    """The cached JSONL file of the built-in corpus, extracted on first use."""
    version = platform.python_version()
    path = os.path.join(cache_dir(), f"stdlib-docstrings-py{version}-v{CORPUS_VERSION}.jsonl")
    if not os.path.exists(path):
        from keras_llm.artifacts import atomic_write

        records = extract_records()
        logger.info("extracted %d docstrings from the standard library into %s",
                    len(records), path)
        atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def builtin_records():
    """The built-in corpus as a list of {"module", "name", "text"} records."""
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def file_fingerprint(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
