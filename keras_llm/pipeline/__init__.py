"""Component pipelines: run pretrain -> finetune -> tune -> export by artifact, with a
metadata store (SQLite) for caching and lineage. Declarations live in `keras_llm.components`.
"""
from keras_llm.pipeline.metadata import MetadataStore, fingerprint_directory
from keras_llm.pipeline.runner import (
    ComponentFailed,
    describe_lineage,
    lineage,
    lineage_chain,
    load_pipeline,
    run_pipeline,
)

__all__ = ["ComponentFailed", "MetadataStore", "describe_lineage", "fingerprint_directory",
           "lineage", "lineage_chain", "load_pipeline", "run_pipeline"]
