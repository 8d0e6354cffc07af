"""Every public layer and model documents itself with Args and an example that runs."""
import inspect

import pytest

import keras_llm.layers
import keras_llm.models

PUBLIC = [getattr(keras_llm.layers, name) for name in keras_llm.layers.__all__] + [
    getattr(keras_llm.models, name) for name in keras_llm.models.__all__]


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda obj: obj.__name__)
def test_public_api_has_docstring_with_example(obj):
    docstring = inspect.getdoc(obj) or ""
    assert ">>> " in docstring, f"{obj.__name__} has no runnable example"
    if inspect.isclass(obj):
        assert "Args:" in docstring, f"{obj.__name__} documents no arguments"
