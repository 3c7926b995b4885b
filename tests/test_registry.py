"""Datasets come from the entry-point group `reformatters.datasets` (and `REFORMATTERS_EXTRA_DATASETS`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import xarray as xr
from reformatters_datasets.example.template_config import example_template_config

from reformatters.cluster import CLUSTER_DIR, dask_cluster_resource
from reformatters.common.package_data import PackageDataError, is_editable_checkout, package_directory
from reformatters.registry import (
    ENTRY_POINT_GROUP,
    EXTRA_DATASETS_ENV,
    DatasetRegistrationError,
    all_datasets,
    dataset_sources,
    get_dataset,
)

REPO = Path(__file__).resolve().parent.parent

PLUGIN_MODULE = """
from reformatters_datasets.example.dataset import ExampleDataset
from reformatters_datasets.example.template_config import example_template_config


def renamed(dataset_id):
    config = example_template_config()
    attrs = config.dataset_attributes.model_copy(update={"dataset_id": dataset_id})
    return ExampleDataset(template_config=config.model_copy(update={"dataset_attributes": attrs}))


class SecondDataset(ExampleDataset):
    def __init__(self, **kwargs):
        kwargs.setdefault("template_config", renamed("second").template_config)
        super().__init__(**kwargs)


def several():
    return [renamed("third"), renamed("fourth")]


THE_OBJECT = renamed("fifth")
CLASHING = renamed("noaa-gfs-forecast")


def not_a_dataset():
    return {"dataset_id": "sixth"}
"""


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "registry_plugin.py").write_text(PLUGIN_MODULE)
    (tmp_path / "registry_broken_plugin.py").write_text("raise RuntimeError('needs a licence key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "registry_plugin"


def ids() -> list[str]:
    return [d.dataset_id for d in all_datasets()]


# This project's own datasets, each declared by an entry point named after it.
PROJECT_DATASET_IDS = sorted(
    ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist is not None and ep.dist.name == "reformatters"
)


def test_the_project_declares_its_datasets_as_entry_points_and_not_the_example(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(EXTRA_DATASETS_ENV)
    sources = dataset_sources()
    assert any(s.value == "reformatters_datasets.noaa.gfs.forecast.dataset:GfsForecastDataset" for s in sources)
    assert "noaa-gfs-forecast" in ids()
    assert "example" not in ids()


def test_the_tests_register_the_example_dataset_through_the_environment() -> None:
    assert "example" in ids()
    assert get_dataset("example").dataset_id == "example"


def test_an_entry_point_names_a_class_a_callable_returning_several_or_an_object(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    references = [f"{plugin_module}:SecondDataset", f"{plugin_module}:several", f"{plugin_module}:THE_OBJECT"]
    monkeypatch.setenv(EXTRA_DATASETS_ENV, ",".join(references))
    assert "noaa-gfs-forecast" in PROJECT_DATASET_IDS
    assert ids() == sorted([*PROJECT_DATASET_IDS, "fifth", "fourth", "second", "third"])


def test_a_plugin_that_fails_to_import_is_a_warning_and_the_others_still_load(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(
        EXTRA_DATASETS_ENV,
        f"registry_broken_plugin:Anything {plugin_module}:not_a_dataset {plugin_module}:SecondDataset",
    )
    with caplog.at_level(logging.WARNING, logger="reformatters.registry"):
        found = ids()
    assert "noaa-gfs-forecast" in found and "second" in found
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "'registry_broken_plugin:Anything'" in warnings[0]
    assert "RuntimeError: needs a licence key" in warnings[0]
    assert f"'{plugin_module}:not_a_dataset'" in warnings[1] and "dict" in warnings[1]


def test_a_dataset_id_declared_twice_is_an_error_naming_both_sources(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EXTRA_DATASETS_ENV, f"{plugin_module}:CLASHING")
    with pytest.raises(DatasetRegistrationError) as raised:
        all_datasets()
    message = str(raised.value)
    assert "'noaa-gfs-forecast' is declared twice" in message
    assert "entry point 'noaa-gfs-forecast = reformatters_datasets.noaa.gfs.forecast.dataset:GfsForecastDataset'" in (
        message
    )
    assert f"'{plugin_module}:CLASHING' in ${EXTRA_DATASETS_ENV}" in message


def test_an_editable_checkout_reads_and_updates_the_repository_templates_and_manifests() -> None:
    assert is_editable_checkout("reformatters.templates")
    config = get_dataset("noaa-gfs-forecast").template_config
    assert config.template_path == REPO / "templates" / "noaa-gfs-forecast" / "latest.zarr"
    assert config.writable_templates_dir() == REPO / "templates"
    assert CLUSTER_DIR == REPO / "cluster"
    assert dask_cluster_resource()["kind"] == "DaskCluster"


def test_a_package_that_is_missing_is_named() -> None:
    with pytest.raises(PackageDataError, match="'no_such_templates_package' cannot be imported"):
        package_directory("no_such_templates_package")


# ---- a separate distribution that declares datasets through the entry point ----

TINY_PYPROJECT = """
[build-system]
requires = ["setuptools>=70"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.3.0"

[project.entry-points."reformatters.datasets"]
{entry_point}

[tool.setuptools]
packages = {packages}
"""

TINY_PLUGIN = '''
"""A dataset of another distribution: the example dataset under another id, with a templates package of its own."""

from typing import Any, ClassVar

from reformatters_datasets.example.dataset import ExampleDataset
from reformatters_datasets.example.template_config import ExampleTemplateConfig, example_template_config


class TinyTemplateConfig(ExampleTemplateConfig):
    templates_package: ClassVar[str] = "tiny_plugin.templates"


def tiny_template_config() -> TinyTemplateConfig:
    config = example_template_config()
    attrs = config.dataset_attributes.model_copy(update={"dataset_id": "tiny-forecast", "name": "Tiny forecast"})
    fields = {name: getattr(config, name) for name in type(config).model_fields}
    return TinyTemplateConfig(**{**fields, "dataset_attributes": attrs})


class TinyDataset(ExampleDataset):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", tiny_template_config())
        super().__init__(**kwargs)
'''


def write_distribution(root: Path, name: str, entry_point: str, files: dict[str, str]) -> Path:
    packages = sorted({str(Path(path).parent).replace("/", ".") for path in files})
    root.mkdir()
    (root / "pyproject.toml").write_text(
        TINY_PYPROJECT.format(name=name, entry_point=entry_point, packages=repr(packages).replace("'", '"'))
    )
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(textwrap.dedent(text))
    return root


def cli(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != EXTRA_DATASETS_ENV}
    env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-m", "reformatters.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_separate_distribution_adds_a_dataset_and_a_broken_one_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_distribution(
        tmp_path / "tiny",
        "tiny-reformatters-plugin",
        'tiny-forecast = "tiny_plugin:TinyDataset"',
        {"tiny_plugin/__init__.py": TINY_PLUGIN, "tiny_plugin/templates/__init__.py": ""},
    )
    broken = write_distribution(
        tmp_path / "broken",
        "broken-reformatters-plugin",
        'broken = "broken_plugin.dataset:BrokenDataset"',
        {
            "broken_plugin/__init__.py": "",
            "broken_plugin/dataset.py": "raise ImportError('broken_plugin needs the eccodes definitions of 1999')\n",
        },
    )
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(site), str(good), str(broken)], check=True, capture_output=True, timeout=300)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    listed = cli(["list"], workdir, site)
    assert listed.returncode == 0, listed.stderr
    ids = [line.split()[0] for line in listed.stdout.splitlines()]
    assert ids == sorted([*PROJECT_DATASET_IDS, "tiny-forecast"]), listed.stdout
    version = example_template_config().dataset_attributes.dataset_version  # the tiny one copies it
    assert f"tiny-forecast                    v{version}    Tiny forecast" in listed.stdout
    warning = listed.stderr.strip()
    assert "WARNING" in warning and len(warning.splitlines()) == 1, warning
    assert "'broken = broken_plugin.dataset:BrokenDataset' of broken-reformatters-plugin 0.3.0" in warning
    assert "ImportError: broken_plugin needs the eccodes definitions of 1999" in warning

    rendered = cli(["update-template", "tiny-forecast", "--output-dir", "out"], workdir, site)
    assert rendered.returncode == 0, rendered.stderr
    template = workdir / "out" / "tiny-forecast" / "latest.zarr"
    assert rendered.stdout.strip() == f"wrote {template.relative_to(workdir)}"
    ds = xr.open_zarr(template, decode_timedelta=True)
    assert ds.attrs["dataset_id"] == "tiny-forecast"
    assert set(ds.data_vars) == {"temperature_2m", "precipitation_surface"}
    assert ds.sizes["init_time"] == 4

    # Installed (not editable), the plugin's own templates are not rewritten in place.
    monkeypatch.delenv(EXTRA_DATASETS_ENV)
    monkeypatch.syspath_prepend(str(site))
    config = get_dataset("tiny-forecast").template_config
    with pytest.raises(PackageDataError, match="--output-dir") as refused:
        config.update_template()
    assert str(site / "tiny_plugin" / "templates") in str(refused.value)
    assert not (site / "tiny_plugin" / "templates" / "tiny-forecast").exists()
