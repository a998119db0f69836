"""mbf-lora's package layout; the metadata is in pyproject.toml (PEP 621).

`kernels` is another PyPI distribution's import name: ours is installed as `mbf.kernels`, from the
top-level kernels/ folder, which setuptools' declarative configuration cannot map beside a search.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mbf", "mbf.*"]), "mbf.kernels"],
    package_dir={"mbf": "mbf", "mbf.kernels": "kernels"},
)
