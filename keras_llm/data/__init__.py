"""Data: sources, the built-in corpus, tokenizers and tf.data pipelines.

Data code never imports a model (see STYLE.md); models never import tf.data.
"""
from keras_llm.data.corpus import builtin_records
from keras_llm.data.pipeline import (
    as_dataset,
    causal_lm_dataset,
    pack_documents,
    pack_tokens,
    split_documents,
    token_chunks,
    tokenized_documents,
    unigram_baseline,
)
from keras_llm.data.sources import TextSource, open_source, read_records
from keras_llm.data.tokenizers import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS", "TextSource", "Tokenizer", "as_dataset", "builtin_records",
    "causal_lm_dataset", "load_tokenizer", "open_source", "pack_documents", "pack_tokens",
    "read_records", "split_documents", "token_chunks", "tokenized_documents", "train_tokenizer", "unigram_baseline",
]
