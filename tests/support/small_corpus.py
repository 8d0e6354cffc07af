"""A small JSONL corpus for end-to-end tests (`tests/support` is on the test path through
`pythonpath` in pytest.ini; the tests are not a package)."""
import json

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A tokenizer turns text into integer ids that a model can embed.",
    "Attention lets every position look at every earlier position.",
    "Packing joins documents with an end-of-document token between them.",
] * 30


def write_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i}: {d}"}) + "\n"
                            for i, d in enumerate(DOCUMENTS)))
    return str(path)
