"""A dataset's structure, rendered to checked-in Zarr metadata and expanded along the append dimension."""

from __future__ import annotations

import json
import warnings
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import dask.array
import numpy as np
import pandas as pd
import xarray as xr
from pydantic import Field, field_validator, model_validator

from reformatters.common.config_models import (
    Coordinate,
    DatasetAttributes,
    DataVar,
    FrozenModel,
    unique_names,
)
from reformatters.common.package_data import PackageDataError, is_editable_checkout, package_directory
from reformatters.common.time_utils import parse_utc

DataVarT = TypeVar("DataVarT", bound=DataVar[Any])

# The repository's templates/, mapped into the installed package by pyproject.toml.
TEMPLATES_PACKAGE = "reformatters.templates"

# Encoding keys that carry over from a loaded template to the expanded one.
_KEPT_ENCODING_KEYS = (
    "chunks",
    "shards",
    "compressors",
    "filters",
    "serializer",
    "_FillValue",
    "dtype",
    "units",
    "calendar",
)

warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)


class TemplateConfig(FrozenModel, Generic[DataVarT]):
    """Dims, coordinates and data variables of a dataset.

    Subclasses give the dimension coordinates other than the append dimension and the derived
    coordinates (such as `valid_time`); everything else is data.
    """

    dims: tuple[str, ...]
    append_dim: str
    append_dim_start: pd.Timestamp
    append_dim_frequency: pd.Timedelta
    dataset_attributes: DatasetAttributes
    coords: tuple[Coordinate, ...]
    data_vars: tuple[DataVarT, ...]
    template_append_length: int = Field(
        4, ge=1, description="positions of the append dimension kept in the checked-in template"
    )

    # The import package whose folder holds DATASET_ID/latest.zarr; a dataset shipped by another
    # distribution names a package of its own.
    templates_package: ClassVar[str] = TEMPLATES_PACKAGE

    @field_validator("append_dim_start", mode="before")
    @classmethod
    def _parse_start(cls, value: Any) -> pd.Timestamp:
        return parse_utc(value)

    @field_validator("append_dim_frequency", mode="before")
    @classmethod
    def _parse_frequency(cls, value: Any) -> pd.Timedelta:
        return pd.Timedelta(value)

    @model_validator(mode="after")
    def _consistent(self) -> TemplateConfig[DataVarT]:
        if self.append_dim not in self.dims:
            raise ValueError(f"append_dim {self.append_dim!r} is not one of dims {self.dims}")
        unique_names(self.data_vars)
        unique_names(self.coords)
        coord_names = {c.name for c in self.coords}
        missing = [d for d in self.dims if d not in coord_names]
        if missing:
            raise ValueError(f"every dimension needs a Coordinate entry; missing: {missing}")
        for var in self.data_vars:
            if len(var.encoding.chunks) != len(self.dims):
                raise ValueError(
                    f"{var.name}: chunks {var.encoding.chunks} have {len(var.encoding.chunks)} dims, "
                    f"the dataset has {len(self.dims)} {self.dims}"
                )
        return self

    # ---- what subclasses provide ----
    @abstractmethod
    def dimension_coordinates(self) -> dict[str, Any]:
        """Values of every dimension coordinate except the append dimension."""

    def derive_coordinates(self, ds: xr.Dataset) -> dict[str, xr.DataArray | tuple[Any, ...]]:
        """Non-dimension coordinates computed from the dimension coordinates (e.g. valid_time)."""
        return {}

    # ---- derived ----
    @property
    def dataset_id(self) -> str:
        return self.dataset_attributes.dataset_id

    @property
    def templates_dir(self) -> Path:
        return package_directory(self.templates_package)

    @property
    def template_path(self) -> Path:
        return self.templates_dir / self.dataset_id / "latest.zarr"

    def writable_templates_dir(self) -> Path:
        """Where `update_template()` writes by default: the checked-in templates of a source checkout.

        An installed copy is refused: a rewrite there would be lost at the next install and never reach git.
        """
        directory = self.templates_dir
        if not is_editable_checkout(self.templates_package):
            raise PackageDataError(
                f"{self.dataset_id}: the checked-in templates at {directory} belong to an installed package, "
                "not a source checkout; pass --output-dir DIR to write the rendered template elsewhere, or run "
                "it in an editable checkout (pip install -e .) to update the template in git"
            )
        return directory

    def data_var(self, name: str) -> DataVarT:
        for var in self.data_vars:
            if var.name == name:
                return var
        raise KeyError(f"{self.dataset_id} has no variable {name!r}; it has {[v.name for v in self.data_vars]}")

    def append_dim_coordinates(self, append_dim_end: pd.Timestamp | str) -> pd.DatetimeIndex:
        end = parse_utc(append_dim_end)
        return pd.date_range(self.append_dim_start, end, freq=self.append_dim_frequency, inclusive="left")

    def template_append_dim_end(self) -> pd.Timestamp:
        return self.append_dim_start + self.append_dim_frequency * self.template_append_length

    # ---- building ----
    def build_template_from_code(self, append_dim_end: pd.Timestamp | str) -> xr.Dataset:
        append_coords = self.append_dim_coordinates(append_dim_end)
        dim_coords: dict[str, Any] = {self.append_dim: append_coords, **self.dimension_coordinates()}
        shape = tuple(len(dim_coords[d]) for d in self.dims)
        data_vars = {
            var.name: xr.Variable(
                self.dims,
                dask.array.full(shape, _fill(var.encoding.fill_value), dtype=var.encoding.dtype, chunks=-1),
                attrs=var.attrs.to_attrs(),
                encoding=var.encoding.to_xarray_encoding(),
            )
            for var in self.data_vars
        }
        ds = xr.Dataset(data_vars, coords=dim_coords, attrs=self.dataset_attributes.to_attrs())
        ds = ds.assign_coords(self.derive_coordinates(ds))
        for coord in self.coords:
            if coord.name not in ds.coords:
                raise ValueError(
                    f"{self.dataset_id}: coordinate {coord.name!r} is declared but neither "
                    "dimension_coordinates() nor derive_coordinates() produces it"
                )
            encoding = coord.encoding.to_xarray_encoding()
            # xarray writes CF time `units`/`calendar` from the encoding; they must not also be attrs.
            ds[coord.name].attrs = {k: v for k, v in coord.attrs.to_attrs().items() if k not in encoding}
            ds[coord.name].encoding = encoding
        undeclared = {str(name) for name in ds.coords} - {c.name for c in self.coords}
        if undeclared:
            raise ValueError(f"{self.dataset_id}: coordinates {sorted(undeclared)} need a Coordinate entry")
        return ds

    def get_template(self, append_dim_end: pd.Timestamp | str) -> xr.Dataset:
        """The checked-in template expanded along the append dimension, lazily (no data allocated)."""
        path = self.template_path
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(
                f"no checked-in template at {path}; run `reformatters update-template {self.dataset_id}`"
            )
        loaded = xr.open_zarr(path, chunks=None, decode_timedelta=True)
        append_coords = self.append_dim_coordinates(append_dim_end)
        coords: dict[str, Any] = {
            str(name): loaded[name].variable.copy(deep=True)
            for name in loaded.dims
            if name != self.append_dim and name in loaded.coords
        }
        coords[self.append_dim] = append_coords
        sizes = {**{d: loaded.sizes[d] for d in loaded.dims}, self.append_dim: len(append_coords)}
        data_vars = {}
        for name, loaded_var in loaded.data_vars.items():
            shape = tuple(sizes[d] for d in loaded_var.dims)
            encoding = _kept_encoding(loaded_var.encoding)
            data_vars[name] = xr.Variable(
                loaded_var.dims,
                dask.array.full(shape, _fill(encoding.get("_FillValue")), dtype=encoding["dtype"], chunks=-1),
                attrs=dict(loaded_var.attrs),
                encoding=encoding,
            )
        ds = xr.Dataset(data_vars, coords=coords, attrs=dict(loaded.attrs))
        ds = ds.assign_coords(self.derive_coordinates(ds))
        for name in loaded.coords:
            ds[name].attrs = dict(loaded[name].attrs)
            ds[name].encoding = _kept_encoding(loaded[name].encoding)
        return ds

    def update_template(self, templates_dir: Path | None = None) -> Path:
        """Render the template into `templates_dir/DATASET_ID/latest.zarr` (default: the checkout's templates)."""
        path = (templates_dir or self.writable_templates_dir()) / self.dataset_id / "latest.zarr"
        write_metadata(self.build_template_from_code(self.template_append_dim_end()), path)
        return path


def _fill(fill_value: Any) -> Any:
    return np.nan if fill_value is None else fill_value


def _kept_encoding(encoding: Mapping[str, Any]) -> dict[str, Any]:
    kept = {k: encoding[k] for k in _KEPT_ENCODING_KEYS if k in encoding}
    if kept.get("shards") is None:
        kept.pop("shards", None)
    return kept


def with_template_encodings(updated: xr.Dataset, template_ds: xr.Dataset) -> xr.Dataset:
    """`updated` with every variable's encoding taken from the template.

    `update_template_with_results` hooks rebuild coordinates (`assign_coords(name=(dims, values))`), which
    drops their encoding; written as is, xarray would pick chunks from the current length and the store's
    structure would drift from the template, so the next update refuses to run.
    """
    restored = updated.copy()
    for name, variable in template_ds.variables.items():
        if name in restored.variables:
            restored[name].encoding = dict(variable.encoding)
    return restored


def write_metadata(ds: xr.Dataset, store: Any, *, mode: str = "w") -> None:
    """Write array metadata and coordinate values, never data-variable chunks."""
    import zarr

    # xarray loads every zero-size dask array before writing (a dataset of a run whose files were all missing has
    # length 0). It is loaded here instead, in this process: a run publishes while its cluster shuts down, and the
    # default scheduler would send the load there.
    ds = ds.copy(deep=False)
    for variable in ds.variables.values():
        if variable.size == 0 and variable.chunks is not None:
            variable.load(scheduler="synchronous")
    with zarr.config.set({"array.write_empty_chunks": False}):
        ds.to_zarr(store, mode=mode, compute=False, zarr_format=3, consolidated=True)  # type: ignore[call-overload]


def template_differences(expected_dir: Path, actual_dir: Path) -> list[str]:
    """Differences between two metadata-only Zarr stores: zarr.json documents and coordinate chunks."""
    differences: list[str] = []
    expected_files = {p.relative_to(expected_dir) for p in expected_dir.rglob("*") if p.is_file()}
    actual_files = {p.relative_to(actual_dir) for p in actual_dir.rglob("*") if p.is_file()}
    for missing in sorted(expected_files - actual_files):
        differences.append(f"missing {missing}")
    for extra in sorted(actual_files - expected_files):
        differences.append(f"unexpected {extra}")
    for rel in sorted(expected_files & actual_files):
        expected_bytes = (expected_dir / rel).read_bytes()
        actual_bytes = (actual_dir / rel).read_bytes()
        if rel.name == "zarr.json":
            if json.loads(expected_bytes) != json.loads(actual_bytes):
                differences.append(f"{rel} differs")
        elif expected_bytes != actual_bytes:
            differences.append(f"{rel} (coordinate values) differ")
    return differences
