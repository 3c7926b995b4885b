"""Files that ship inside a package (templates, Kubernetes manifests), found with `importlib.resources`."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
from pathlib import Path


class PackageDataError(RuntimeError):
    """A package's data cannot be read or written where it is; the message says what to do."""


def package_directory(package: str) -> Path:
    """The directory of an importable package, as a filesystem path.

    In an editable install of this project that is the checkout's own folder (`templates/`, `cluster/`),
    in an installed wheel the folder inside site-packages.
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as error:
        raise PackageDataError(
            f"package {package!r} cannot be imported ({error}); reinstall the distribution that provides it"
        ) from error
    if not isinstance(root, Path):
        raise PackageDataError(
            f"package {package!r} is not a directory on disk ({root!r}, e.g. a zipped install); "
            "install it unzipped (pip install)"
        )
    return root


def is_editable_checkout(package: str) -> bool:
    """Whether `package` is read from a source checkout rather than from an installed copy.

    True for an editable install (`pip install -e .`, PEP 610's `dir_info.editable`) and for a source tree
    on `sys.path` that no installed distribution claims; false for a wheel or `pip install .`, whose files
    are copies that a rewrite would silently lose at the next install.
    """
    top_level = package.partition(".")[0]
    names = set(importlib.metadata.packages_distributions().get(top_level, []))
    if not names:
        return True
    # Every copy counts: a checkout on sys.path also holds the build's `*.egg-info`, without direct_url.json.
    for distribution in importlib.metadata.distributions():
        if distribution.metadata["Name"] not in names:
            continue
        direct_url = distribution.read_text("direct_url.json")
        if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable", False):
            return True
    return False
