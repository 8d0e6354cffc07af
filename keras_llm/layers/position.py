"""Position encodings: the fixed sinusoidal table and learned position embeddings."""
import math

import keras
from keras import ops

from keras_llm.layers.validation import check_positive


@keras.saving.register_keras_serializable(package="keras_llm")
class SinusoidalPositionEncoding(keras.layers.Layer):
    """Fixed sinusoidal position encoding (Vaswani et al., 2017, section 3.5).

    `PE[pos, 2i] = sin(pos / max_wavelength^(2i/d))`, `PE[pos, 2i+1] = cos(...)`. Returns
    the `(length, hidden)` table for the positions of `inputs` (shape `(batch, length,
    hidden)`), starting at `start_index`, to be added to the token embeddings. No weights.

    Args:
        max_wavelength: the longest wavelength of the sinusoids.

    Example:

    >>> encoding = SinusoidalPositionEncoding()
    >>> keras.ops.shape(encoding(keras.ops.zeros((2, 6, 16))))
    (6, 16)

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
    """

    def __init__(self, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(max_wavelength, (int, float)) or max_wavelength <= 1:
            raise ValueError(f"max_wavelength must be a number > 1; got {max_wavelength!r}")
        self.max_wavelength = max_wavelength

    def call(self, inputs, start_index=0):
        length, hidden = ops.shape(inputs)[-2], inputs.shape[-1]
        positions = ops.cast(ops.arange(length) + start_index, self.compute_dtype)
        # Both members of a (sin, cos) pair share the frequency of index 2i.
        pair_index = ops.cast(ops.arange(hidden) // 2 * 2, self.compute_dtype)
        inverse_frequency = ops.exp(-math.log(self.max_wavelength) * pair_index / hidden)
        angles = positions[:, None] * inverse_frequency[None, :]
        is_even = ops.equal(ops.arange(hidden) % 2, 0)
        return ops.where(is_even[None, :], ops.sin(angles), ops.cos(angles))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[-2:])

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}


@keras.saving.register_keras_serializable(package="keras_llm")
class LearnedPositionEmbedding(keras.layers.Layer):
    """A trained `(max_length, hidden)` position table (as in BERT and GPT-2).

    Returns the rows for the positions of `inputs` (shape `(batch, length, hidden)`),
    starting at `start_index`, to be added to the token embeddings.

    Args:
        max_length: the longest sequence the table covers.
        initializer: initializer of the table.

    Example:

    >>> embedding = LearnedPositionEmbedding(max_length=32)
    >>> keras.ops.shape(embedding(keras.ops.zeros((2, 6, 16))))
    (6, 16)

    References:
        - [Devlin et al., 2019](https://arxiv.org/abs/1810.04805)
    """

    def __init__(self, max_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        check_positive("max_length", max_length)
        self.max_length = max_length
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.max_length, input_shape[-1]),
            initializer=self.initializer)

    def call(self, inputs, start_index=0):
        length = ops.shape(inputs)[-2]
        if isinstance(length, int) and isinstance(start_index, int) and (
                start_index + length > self.max_length):
            raise ValueError(
                f"positions {start_index}..{start_index + length - 1} exceed "
                f"max_length={self.max_length}")
        # convert_to_tensor: JAX (>= 0.10) no longer slices a keras Variable directly.
        table = ops.convert_to_tensor(self.embeddings)
        return ops.slice(table, (start_index, 0), (length, self.embeddings.shape[-1]))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[-2:])

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length,
                "initializer": keras.initializers.serialize(self.initializer)}


POSITION_KINDS = ("learned", "sinusoidal", "rotary")

# RoPE's base wavelength (Su et al., 2021; GPT-NeoX, Llama).
ROTARY_MAX_WAVELENGTH = 10_000


def position_layer(kind, max_length, initializer, dtype=None, name="position_embedding"):
    """The position layer a model config names: "learned" (a `LearnedPositionEmbedding` of
    `max_length` rows drawn from `initializer`), "sinusoidal" (fixed, nothing to learn), or
    None for "rotary", where attention rotates queries and keys instead (see
    `rotary_max_wavelength`) and nothing is added to the embeddings.

    >>> position_layer("sinusoidal", 8, "zeros").__class__.__name__
    'SinusoidalPositionEncoding'
    >>> position_layer("rotary", 8, "zeros") is None
    True
    """
    if kind == "learned":
        return LearnedPositionEmbedding(max_length, initializer=initializer, dtype=dtype,
                                        name=name)
    if kind == "sinusoidal":
        return SinusoidalPositionEncoding(dtype=dtype, name=name)
    if kind == "rotary":
        return None
    raise ValueError(f"position must be one of {', '.join(POSITION_KINDS)}; got {kind!r}")


def rotary_max_wavelength(kind):
    """The attention layers' `rotary_max_wavelength` for position `kind` (None unless
    "rotary")."""
    return ROTARY_MAX_WAVELENGTH if kind == "rotary" else None


def add_positions(x, layer, start_index=0):
    """`x` (embeddings) plus `layer`'s positions from `start_index`; `x` when `layer` is None
    (rotary models add nothing)."""
    if layer is None:
        return x
    return x + ops.cast(layer(x, start_index=start_index), x.dtype)
