"""GELU with a hand-written gradient: the same values as Keras', fewer passes over memory.

Outside XLA every elementwise op reads and writes the whole `(batch, length, 4 x width)`
activation, and differentiating Keras' GELU formula op by op costs about twenty such passes
per feed-forward layer and step. Writing the derivative out needs about half as many:

    gelu_tanh(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3)))  with k = sqrt(2 / pi)
                 = x sigmoid(x (2k + 2k 0.044715 x^2))      (0.5 (1 + tanh a) = sigmoid 2a)
    d/dx         = s + x s (1 - s) (2k + 3 2k 0.044715 x^2) with s the sigmoid above
    gelu(x)      = x Phi(x),   d/dx = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi)

The gradient is one fused function of `x` and the upstream gradient (`keras_llm.fusion`:
one XLA loop on TensorFlow; forward + backward of a gpt-tiny feed-forward activation goes
from 5.5 to 3.1 ms in isolation on 2 CPU cores). It recomputes the sigmoid or CDF from `x`
instead of keeping the forward pass's, which also frees that tensor. With `training=True`
the forward pass is one fused loop too (a gpt-small `(8, 256, 2048)` activation: 11.4 to
4.8 ms); otherwise it is plain `keras.ops`, which is what exported models trace (they call
with training off), so a SavedModel needs no XLA. On the torch backend (no
`keras.ops.custom_gradient`) Keras' own GELU is used.
"""
import math

import keras
from keras import ops

from keras_llm.fusion import fused

_TANH_LINEAR = 2 * math.sqrt(2 / math.pi)
_TANH_CUBIC = _TANH_LINEAR * 0.044715
_INV_SQRT_2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def upstream_gradient(args, upstream):
    """The upstream gradient a `keras.ops.custom_gradient` gradient function receives:
    positionally on TensorFlow, as `upstream=` on JAX."""
    return args[0] if upstream is None else upstream


def _gated(gate, gradient_of):
    """`x * gate(x)`, differentiated by `gradient_of(x, upstream)`: a pair of functions of
    `x`, the forward pass as plain ops and as one fused loop."""

    def forward(x):
        return x * gate(x)

    def differentiated(compute):
        @ops.custom_gradient
        def activation(x):
            def gradient(*args, upstream=None):
                return gradient_of(x, upstream_gradient(args, upstream))

            return compute(x), gradient

        return activation

    return differentiated(forward), differentiated(fused(forward))


def _gelu_tanh_sigmoid(x):
    return ops.sigmoid(x * (_TANH_LINEAR + _TANH_CUBIC * ops.square(x)))


@fused
def _gelu_tanh_gradient(x, upstream):
    s = _gelu_tanh_sigmoid(x)
    y = x * s
    slope = _TANH_LINEAR + (3 * _TANH_CUBIC) * ops.square(x)
    return upstream * (s + (y - y * s) * slope)


def _gelu_cdf(x):
    return 0.5 + 0.5 * ops.erf(x * _INV_SQRT_2)


@fused
def _gelu_gradient(x, upstream):
    density = ops.exp(-0.5 * ops.square(x)) * _INV_SQRT_2PI
    return upstream * (_gelu_cdf(x) + x * density)


_gelu_tanh = _gated(_gelu_tanh_sigmoid, _gelu_tanh_gradient)
_gelu = _gated(_gelu_cdf, _gelu_gradient)


def gelu_tanh(x, training=False):
    """GPT-2's tanh approximation of GELU (`keras.activations.gelu(x, approximate=True)`).

    `training=True` runs the forward pass as one fused loop (see the module docstring)."""
    if keras.backend.backend() == "torch":
        return keras.activations.gelu(x, approximate=True)
    return _gelu_tanh[bool(training)](x)


def gelu(x, training=False):
    """Exact GELU, `x Phi(x)` (`keras.activations.gelu(x, approximate=False)`).

    `training=True` runs the forward pass as one fused loop (see the module docstring)."""
    if keras.backend.backend() == "torch":
        return keras.activations.gelu(x, approximate=False)
    return _gelu[bool(training)](x)


def relu(x, training=False):
    """`keras.activations.relu`, with the `training` argument the other activations take."""
    del training  # one op: nothing to fuse
    return keras.activations.relu(x)
