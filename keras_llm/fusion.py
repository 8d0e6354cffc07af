"""Elementwise kernels run as one fused loop: XLA-compiled on TensorFlow, plain elsewhere.

Outside XLA, TensorFlow runs every elementwise op as its own pass over memory, so a formula
of ten ops over a large activation costs ten passes. `fused(fn)` compiles a function written
with `keras.ops` into one XLA program on the TensorFlow backend (a single loop, launched as
one op inside the ordinary graph, whose matmuls stay oneDNN's); on JAX, which compiles the
whole step anyway, and on torch it is `fn` itself.

Use it for training-only code paths (loss kernels, hand-written gradients): a layer's
forward pass is also what `keras-llm export` saves, and an XLA-compiled function in a
SavedModel would need XLA in the model server. Fused programs are compiled once per input
shape and dtype, and pay only on large tensors: on 2 CPU cores a (16, 128, 1024) GELU
gradient runs about 2x faster fused, a (16, 128, 256) layer-norm gradient slower.
"""
import functools

import keras


def fused(fn):
    """`fn(*tensors)` as one XLA program on TensorFlow; `fn` itself on other backends.

    Each `fused(fn)` compiles its own program (once per input shape and dtype). A function
    that assigns variables passed to it must get its own `fused(fn)` per owner of those
    variables (see `keras_llm.training.optim.AdamW`), as any `tf.function` must.

    Example:

    >>> from keras import ops
    >>> scale_shift = fused(lambda x, scale: x * scale + 1.0)
    >>> [float(v) for v in ops.convert_to_numpy(scale_shift(ops.ones((2,)), 3.0))]
    [4.0, 4.0]
    """
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if keras.backend.backend() != "tensorflow":
            return fn(*args)
        if compiled is None:
            import tensorflow as tf

            compiled = tf.function(fn, jit_compile=True, autograph=False)
        return compiled(*args)

    return call
