"""Layer normalization with a hand-written gradient: Keras' layer, fewer passes over memory."""
import keras
from keras import ops

from keras_llm.layers.activations import upstream_gradient


def _layer_norm(x, gamma, beta, epsilon):
    """Normalizes the last axis; gradients written out (the textbook form), not traced
    through `moments`, which costs about twice the elementwise passes per step."""

    @ops.custom_gradient
    def normalize(x, gamma, beta):
        centered = x - ops.mean(x, axis=-1, keepdims=True)
        inverse_std = ops.rsqrt(ops.mean(ops.square(centered), axis=-1, keepdims=True)
                                + epsilon)
        normalized = centered * inverse_std

        def gradient(*args, upstream=None):
            upstream = upstream_gradient(args, upstream)
            d_normalized = upstream * gamma
            d_x = inverse_std * (
                d_normalized - ops.mean(d_normalized, axis=-1, keepdims=True)
                - normalized * ops.mean(d_normalized * normalized, axis=-1, keepdims=True))
            batch_axes = tuple(range(len(x.shape) - 1))
            return (d_x, ops.sum(upstream * normalized, axis=batch_axes),
                    ops.sum(upstream, axis=batch_axes))

        return normalized * gamma + beta, gradient

    return normalize(x, gamma, beta)


@keras.saving.register_keras_serializable(package="keras_llm")
class LayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` (same weights, config and values) whose backward
    pass is written out instead of differentiated op by op.

    Used for every norm in keras-llm's blocks and models: outside XLA each elementwise op is
    a pass over the activations, and this halves the passes of the backward pass (about 2% of
    a gpt-tiny training step on 2 CPU cores). Normalizing over other axes than the last, RMS
    scaling, and the torch backend take Keras' own computation.

    Args:
        epsilon, center, scale, axis and the rest: as for `keras.layers.LayerNormalization`.

    Example:

    >>> norm = LayerNormalization(epsilon=1e-5)
    >>> y = norm(keras.ops.convert_to_tensor([[1.0, 2.0, 3.0]]))
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(y)[0]]
    [-1.225, 0.0, 1.225]
    """

    def call(self, inputs):
        axes = self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
        last_axis_only = list(axes) in ([-1], [len(inputs.shape) - 1])
        if (self.rms_scaling or not last_axis_only
                or keras.backend.backend() == "torch"):
            return super().call(inputs)
        # Float32 at least, as Keras computes it for half-precision inputs.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        width = x.shape[-1]
        gamma = ops.cast(self.gamma, dtype) if self.scale else ops.ones((width,), dtype)
        beta = ops.cast(self.beta, dtype) if self.center else ops.zeros((width,), dtype)
        return ops.cast(_layer_norm(x, gamma, beta, self.epsilon), self.compute_dtype)
