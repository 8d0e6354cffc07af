import pytest
from small_corpus import write_corpus


@pytest.fixture
def corpus(tmp_path):
    """A JSONL corpus of 120 short documents."""
    return write_corpus(tmp_path)
