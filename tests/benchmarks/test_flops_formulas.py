"""The model FLOPs behind train_throughput's MFU, checked against the matmuls of the
training step's own graph (forward and gradients)."""
import math
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import train_throughput  # noqa: E402

# A vocabulary large against the body, so a formula that miscounts the tied head is far off.
SHAPE = dict(vocab=1024, layers=2, width=128, heads=2, seq=32, batch=2)


def matmul_flops(graph, seen=None):
    """2 m n k summed over the (batch) matmuls of `graph` and the functions it calls."""
    seen = set() if seen is None else seen
    total = 0
    for op in graph.get_operations():
        if op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            a, out = op.inputs[0].shape, op.outputs[0].shape
            transposed = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
            total += 2 * math.prod(out) * (a[-2] if transposed else a[-1])
    for name, function in graph._functions.items():
        if name not in seen and getattr(function, "graph", None) is not None:
            seen.add(name)
            total += matmul_flops(function.graph, seen)
    return total


@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_flops_per_token_match_the_training_graph(name):
    builder = train_throughput.MODEL_BUILDERS[name][0]
    model, make_step, flops_per_token = builder(SHAPE)
    ids = np.random.default_rng(0).integers(
        0, SHAPE["vocab"], size=(SHAPE["batch"], SHAPE["seq"] + 1), dtype=np.int32)
    x, y = make_step(ids)
    x = tf.nest.map_structure(tf.constant, x)
    model(x)

    @tf.function
    def gradients(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, model.trainable_variables)

    graph = gradients.get_concrete_function(x, tf.constant(y)).graph
    counted = matmul_flops(graph) / (SHAPE["batch"] * SHAPE["seq"])
    # The formula also counts 6 FLOPs per bias and norm weight (not matmuls): about 13 of
    # every 12 * width + 13 body parameters, under 1% here.
    assert flops_per_token(model, SHAPE) == pytest.approx(counted, rel=0.015)
