"""Argument checks shared by the layers: each error names the argument and what was expected."""


def check_positive(name, value):
    """Raises a ValueError unless `value` is an integer > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def check_rate(name, value):
    """Raises a ValueError unless `value` is a probability in [0, 1)."""
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a rate in [0, 1); got {value!r}")


def check_shape(tensor, name, axes, broadcast=False):
    """Raises a ValueError unless the static shape of `tensor` fits `axes`.

    `axes` is a sequence of `(label, size)` pairs, one per axis; a size of `None` accepts any
    size. With `broadcast=True` a size of 1 is accepted too (masks broadcast over queries).
    Only statically known sizes are checked, so this costs nothing inside a compiled graph.
    """
    if tensor is None:
        return
    shape = tuple(tensor.shape)
    fits = len(shape) == len(axes) and all(
        want is None or got is None or got == want or (broadcast and got == 1)
        for got, (_, want) in zip(shape, axes))
    if not fits:
        labels = ", ".join(label for label, _ in axes)
        sizes = ", ".join("?" if size is None else str(size) for _, size in axes)
        raise ValueError(
            f"{name} must have shape ({labels}) = ({sizes}); got shape {shape}")
