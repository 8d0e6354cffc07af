"""`linear`: the same product as keras' matmul, without shape arithmetic in dynamic graphs."""
import doctest

import keras
import numpy as np
import pytest

from keras_llm.layers import linear as linear_module
from keras_llm.layers.linear import linear


def values(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 1, 4)])
def test_linear_equals_matmul_plus_bias(shape):
    x, kernel, bias = values(shape, 0), values((4, 6), 1), values((6,), 2)
    expected = x @ kernel + bias
    np.testing.assert_allclose(keras.ops.convert_to_numpy(linear(x, kernel, bias)), expected,
                               atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(linear(x, kernel)), x @ kernel,
                               atol=1e-5)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize("length", [1, None])
def test_dynamic_shapes_take_a_constant_shape_path(length):
    import tensorflow as tf

    kernel, bias = values((4, 6), 1), values((6,), 2)
    function = tf.function(lambda x: linear(x, kernel, bias),
                           input_signature=[tf.TensorSpec([None, length, 4], tf.float32)])
    graph = function.get_concrete_function().graph
    operations = {op.type for op in graph.get_operations()}
    # keras' matmul of a 3-D tensor is tf.tensordot, which computes its reshapes at run time.
    assert not {"Prod", "GatherV2"} & operations
    if length == 1:
        assert "Shape" not in operations  # every reshape target is a constant
    x = values((3, 2 if length is None else 1, 4), 0)
    np.testing.assert_allclose(function(x).numpy(), x @ kernel + bias, atol=1e-5)


def test_docstring_examples_run():
    results = doctest.testmod(linear_module)
    assert results.attempted > 0 and results.failed == 0
