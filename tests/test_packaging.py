"""The installed layout: cli, components and configs live under keras_llm, nothing generic."""
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_maps_top_level_folders_under_keras_llm(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("keras_llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"keras_llm", next(n for n in top_level if n.endswith(".dist-info"))}
    for expected in ("keras_llm/cli.py", "keras_llm/components/__init__.py",
                     "keras_llm/configs/gpt-tiny.yaml", "keras_llm/configs/gpt-small.yaml"):
        assert expected in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "keras-llm = keras_llm.cli:main" in entry_points


def test_installed_package_has_cli_and_configs():
    import importlib.resources

    import keras_llm.cli
    import keras_llm.components  # noqa: F401

    assert callable(keras_llm.cli.main)
    assert (importlib.resources.files("keras_llm.configs") / "gpt-tiny.yaml").is_file()


def test_checkout_on_sys_path_sees_the_same_package():
    """`python -c ...` run from the repository root imports the checkout's keras_llm (the
    current directory comes first on sys.path); its components and configs must be there too,
    not only in an install. CI once failed on this in subprocess-based tests."""
    code = ("import keras_llm.cli, keras_llm.components, keras_llm.configs, pathlib;"
            "print(pathlib.Path(keras_llm.configs.__file__).parent)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                            capture_output=True, text=True)
    configs = pathlib.Path(result.stdout.strip().splitlines()[-1])
    assert (configs / "gpt-tiny.yaml").is_file()
    assert configs.resolve() == (REPO / "configs").resolve()
