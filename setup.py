"""keras-llm: Transformer language models with TensorFlow and Keras, from raw text to TF Serving.

The repository keeps `cli.py`, `components/` and `configs/` at the top level for readability;
`keras_llm/cli.py`, `keras_llm/components` and `keras_llm/configs` are symlinks to them, so
both a checkout and an install see one package (`keras_llm.cli`, `keras_llm.components`,
`keras_llm.configs`) and no generic top-level name lands in site-packages.
"""
import os

from setuptools import find_packages, setup


PACKAGES = find_packages(include=["keras_llm", "keras_llm.*"])

setup(
    name="keras-llm",
    version="0.1.0",
    description="Transformer language models with TensorFlow and Keras, from raw text to TF Serving.",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=PACKAGES,
    package_data={"keras_llm.configs": ["*.yaml"]},
    install_requires=[
        "tensorflow==2.21.*",
        "keras==3.15.*",
        "keras-hub==0.32.*",
        "tensorflow-text==2.21.*",
        "tensorboard==2.21.*",
        "tensorflow-datasets==4.9.*",
        "keras-tuner==1.4.*",
        "scikit-learn>=1.3,<2",  # KerasTuner's Bayesian optimization (keras-llm tune)
        "click==8.*",
        "pyyaml>=6,<7",
    ],
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist==3.8.*"]},
    entry_points={"console_scripts": ["keras-llm=keras_llm.cli:main"]},
)
