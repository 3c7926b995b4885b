"""Package list for setuptools; everything else is in pyproject.toml.

`datasets/` installs as `reformatters_datasets` (so Hugging Face's `datasets` is never shadowed), which
pyproject.toml's declarative package discovery cannot rename: every subpackage is listed here instead.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["reformatters", "reformatters.*"]),
        "reformatters_datasets",
        *(f"reformatters_datasets.{name}" for name in find_packages("datasets")),
        "reformatters.templates",
        "reformatters.cluster_manifests",
    ]
)
