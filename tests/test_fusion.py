import numpy as np
import pytest

from keras_llm.fusion import fused


def _scaled_sum(x, y):
    from keras import ops

    return ops.sum(x * y, axis=-1) + 1.0


def test_fused_function_computes_what_it_wraps():
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    y = np.random.default_rng(1).normal(size=(4, 8)).astype("float32")
    np.testing.assert_allclose(np.asarray(fused(_scaled_sum)(x, y)),
                               (x * y).sum(-1) + 1.0, rtol=1e-5)


def test_fused_function_is_one_xla_compiled_call_in_a_tensorflow_graph():
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        pytest.skip("XLA compilation inside a graph is the TensorFlow backend's")
    kernel = fused(_scaled_sum)

    @tf.function
    def outer(x):
        return kernel(x, x)

    graph = outer.get_concrete_function(tf.TensorSpec((2, 3), tf.float32)).graph
    calls = [op for op in graph.get_operations() if "_XlaMustCompile" in op.node_def.attr]
    assert [op.get_attr("_XlaMustCompile") for op in calls] == [True]
    # Nothing of the kernel's arithmetic is left outside the compiled call.
    assert not [op for op in graph.get_operations() if op.type in ("Mul", "Sum", "AddV2")]
