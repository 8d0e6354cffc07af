"""`x @ kernel + bias` over the last axis: no shape arithmetic in dynamic-shape graphs, and
on TensorFlow a kernel gradient computed in the orientation oneDNN runs faster."""
import math

import keras
from keras import ops

from keras_llm.layers.activations import upstream_gradient

# Products with fewer rows than this keep the matmul's traced gradient: the orientation of
# the kernel gradient pays on training-sized products only, and a decoding step's few rows
# should not go through a custom-gradient wrapper.
HAND_GRADIENT_MIN_ROWS = 256


def linear(x, kernel, bias=None, kernel_transpose=None):
    """`x @ kernel (+ bias)` for `x` of shape `(..., in)` with a static `in`; `kernel` is
    `(in, out)`. `kernel_transpose`, where the caller has `kernel^T` for free (a tied
    embedding table: the kernel is the table's transpose), serves the hand gradient's
    `dy kernel^T` (see `kernel_gradient_product`).

    Keras' TensorFlow matmul of a 3-D tensor by a matrix is `tf.tensordot`, which computes its
    reshapes from the runtime shape: about ten small ops (Shape, GatherV2, Prod, ConcatV2,
    Transpose) per product. Constant folding removes them when every dimension is static,
    the case of training and of in-process generation. In a shape-polymorphic graph (an
    exported signature's decoding loop) they stay, and cost about 7% of each decoding step;
    there `x` is flattened to 2-D with constant reshape targets instead (the length is
    static within a decoding step: 1). The bias is added after the reshape back: oneDNN's
    fused matmul + bias runs slower on a decoding step's single row.

    With static shapes and at least `HAND_GRADIENT_MIN_ROWS` rows, the TensorFlow product
    goes through `kernel_gradient_product`, whose backward pass computes the same gradients
    in a faster orientation.

    Example:

    >>> import keras
    >>> y = linear(keras.ops.ones((2, 3, 4)), keras.ops.ones((4, 5)), keras.ops.ones((5,)))
    >>> keras.ops.shape(y), float(y[0, 0, 0])
    ((2, 3, 5), 5.0)
    """
    static = None not in x.shape
    rows = math.prod(x.shape[:-1]) if static else None
    if (static and rows >= HAND_GRADIENT_MIN_ROWS
            and keras.backend.backend() == "tensorflow"):
        y = kernel_gradient_product(ops.reshape(x, (rows, x.shape[-1])), kernel,
                                    kernel_transpose)
        y = ops.reshape(y, (*x.shape[:-1], kernel.shape[-1]))
    elif len(x.shape) == 2 or static:
        y = ops.matmul(x, kernel)
    else:
        y = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), kernel)
        middle = [size if size is not None else ops.shape(x)[axis]
                  for axis, size in enumerate(x.shape[1:-1], start=1)]
        y = ops.reshape(y, (-1, *middle, kernel.shape[-1]))
    return y if bias is None else ops.add(y, bias)  # a BiasAdd on TensorFlow, as keras Dense


def materialized_transpose(matrix):
    """The transpose of a 2-D `matrix`, written out as a tensor of its own.

    TensorFlow's graph optimizer folds a transpose that feeds a matmul into the matmul's
    transpose flag, and oneDNN's CPU kernel for a transposed right operand runs slower on
    a training step's shapes: over 2,048 rows on 2 CPU cores, `dy kernel^T` for a
    `(512, 2048)` kernel (a feed-forward layer's input projection) takes 13.5 ms that way,
    10.5 ms as a copy of the 4 MB kernel's transpose and a plain product. Through a 3-D
    view the transpose is not one the optimizer folds.

    Example:

    >>> import keras
    >>> matrix = keras.ops.reshape(keras.ops.arange(6.0), (2, 3))
    >>> keras.ops.convert_to_numpy(materialized_transpose(matrix)).tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    rows, columns = matrix.shape
    return ops.reshape(ops.transpose(ops.reshape(matrix, (rows, columns, 1)), (1, 0, 2)),
                       (columns, rows))


def kernel_gradient_product(x, kernel, kernel_transpose=None):
    """`x @ kernel` for a 2-D `x`, differentiated by hand, each gradient in the orientation
    oneDNN's CPU matmul runs fastest.

    - The input gradient `dy kernel^T` multiplies by `kernel_transpose` when given, and
      otherwise, for a float32 kernel, by `materialized_transpose(kernel)`: a transposed
      operand costs more than copying the kernel. A GPT-small (width 512) feed-forward
      input projection, forward and backward over 2,048 rows: 26.2 -> 19.5 ms; its
      attention's `q|k|v` projection 16.5 -> 14.5 ms. In bfloat16 the transposed operand
      is the faster one (the copy measured 0.91-1.03x in isolation), so it stays.
    - The kernel's gradient `x^T dy` is computed as `(dy^T x)^T` when the kernel has more
      rows than columns. oneDNN runs markedly slower when its output is narrower than it
      is tall: for the `(4 w, w)` kernel of a feed-forward layer's output projection, over
      2,048 rows on 2 CPU cores, `x^T dy` (output `(4 w, w)`) runs at 146 GFLOP/s at width
      512 where `dy^T x` (output `(w, 4 w)`) plus a transpose of the small result runs at
      210.

    Same values as the traced gradient up to float rounding.

    Example:

    >>> import keras
    >>> x, kernel = keras.ops.ones((3, 4)), keras.ops.ones((4, 2))
    >>> keras.ops.convert_to_numpy(kernel_gradient_product(x, kernel))[0].tolist()
    [4.0, 4.0]
    """
    # Values, not variables: TensorFlow's custom gradients refuse functions that read
    # variables (keras converts a variable to the variable itself).
    kernel = ops.copy(kernel)
    kernel_transpose = None if kernel_transpose is None else ops.copy(kernel_transpose)

    @ops.custom_gradient
    def product(x, kernel):
        def gradient(*args, upstream=None):
            upstream = upstream_gradient(args, upstream)
            if kernel_transpose is not None:
                transposed = kernel_transpose
            elif keras.backend.standardize_dtype(kernel.dtype) == "float32":
                transposed = materialized_transpose(kernel)
            else:
                transposed = ops.transpose(kernel)
            d_x = ops.matmul(upstream, transposed)
            if kernel.shape[0] > kernel.shape[1]:
                d_kernel = ops.transpose(ops.matmul(ops.transpose(upstream), x))
            else:
                d_kernel = ops.matmul(ops.transpose(x), upstream)
            return d_x, d_kernel

        return ops.matmul(x, kernel), gradient

    return product(x, kernel)


def embedding_logits(table, hidden, hand_gradient=True):
    """`table(hidden, reverse=True)` for a keras-hub `ReversibleEmbedding`: the output
    projection onto the vocabulary, in the table's compute dtype, through `linear` (with
    `hand_gradient`; a tied table is the kernel's transpose, so the input gradient
    multiplies by the table itself) or `keras.ops.matmul` (where the hand gradient does
    not pay: few rows).

    Keras' embedding layers opt out of autocasting, and a layer that does clears the
    autocast scope when it is called inside another layer's call: there the reverse pass
    multiplies by the float32 table, and so does a product with the table read directly.
    Under a mixed policy the projection (for GPT-2 small a quarter of the step's FLOPs)
    then runs in float32 and returns float32 logits. Cast, it runs in bfloat16 like every
    other product; the losses take the logits to float32 themselves.

    Example:

    >>> import keras
    >>> from keras_hub.layers import ReversibleEmbedding
    >>> table = ReversibleEmbedding(10, 4, dtype="mixed_bfloat16")
    >>> table.build((None,))
    >>> logits = embedding_logits(table, keras.ops.ones((2, 4), "bfloat16"))
    >>> keras.backend.standardize_dtype(logits.dtype)
    'bfloat16'
    """
    if table.tie_weights:
        weights = ops.cast(table.embeddings, table.compute_dtype)
        kernel, kernel_transpose = ops.transpose(weights), weights
    else:
        kernel = ops.cast(table.reverse_embeddings, table.compute_dtype)
        kernel_transpose = None
    if not hand_gradient:
        return ops.matmul(hidden, kernel)
    return linear(hidden, kernel, kernel_transpose=kernel_transpose)
