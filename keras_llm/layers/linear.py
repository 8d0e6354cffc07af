"""`x @ kernel + bias` over the last axis, without shape arithmetic in dynamic-shape graphs."""
from keras import ops


def linear(x, kernel, bias=None):
    """`x @ kernel (+ bias)` for `x` of shape `(..., in)` with a static `in`; `kernel` is
    `(in, out)`.

    Keras' TensorFlow matmul of a 3-D tensor by a matrix is `tf.tensordot`, which computes its
    reshapes from the runtime shape: about ten small ops (Shape, GatherV2, Prod, ConcatV2,
    Transpose) per product. Constant folding removes them when every dimension is static,
    the case of training and of in-process generation, and there `x` goes to keras' matmul
    as is. In a shape-polymorphic graph (an exported signature's decoding loop) they stay,
    and cost about 7% of each decoding step; there `x` is flattened to 2-D with constant
    reshape targets instead (the length is static within a decoding step: 1). The bias is
    added after the reshape back: oneDNN's fused matmul + bias runs slower on a decoding
    step's single row.

    Example:

    >>> import keras
    >>> y = linear(keras.ops.ones((2, 3, 4)), keras.ops.ones((4, 5)), keras.ops.ones((5,)))
    >>> keras.ops.shape(y), float(y[0, 0, 0])
    ((2, 3, 5), 5.0)
    """
    if len(x.shape) == 2 or None not in x.shape:
        y = ops.matmul(x, kernel)
    else:
        y = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), kernel)
        middle = [size if size is not None else ops.shape(x)[axis]
                  for axis, size in enumerate(x.shape[1:-1], start=1)]
        y = ops.reshape(y, (-1, *middle, kernel.shape[-1]))
    return y if bias is None else ops.add(y, bias)  # a BiasAdd on TensorFlow, as keras Dense
