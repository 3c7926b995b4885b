"""Frozen, validated models that describe a dataset's structure.

Everything published as Zarr attributes lives in `attrs`; everything that only steers processing
(GRIB element and level, kept mantissa bits, deaccumulation) lives in `internal_attrs` and never
reaches the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class BloscCompressor(FrozenModel):
    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "zstd"
    clevel: int = Field(3, ge=0, le=9)
    shuffle: Literal["noshuffle", "shuffle", "bitshuffle"] = "shuffle"

    def to_codec(self) -> Any:
        from zarr.codecs import BloscCodec

        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle)


class Encoding(FrozenModel):
    """How one array is stored. `shards` is None for an unsharded array."""

    dtype: str
    fill_value: float | int | None
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    compressors: tuple[BloscCompressor, ...] = (BloscCompressor(),)
    # A CRC-32C of each compressed chunk, checked on every read: a reader that combines a shard's index with
    # chunks of another version of the shard (a partial read while the object is replaced) gets an error,
    # never wrong values.
    checksum: Literal["crc32c"] | None = "crc32c"
    # CF time encoding for datetime64 / timedelta64 coordinates.
    units: str | None = None
    calendar: str | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        try:
            np.dtype(value)
        except TypeError as error:
            raise ValueError(f"dtype {value!r} is not a numpy dtype (e.g. 'float32', 'int64')") from error
        return value

    @model_validator(mode="after")
    def _shards_hold_whole_chunks(self) -> Encoding:
        if self.shards is None:
            return self
        if len(self.shards) != len(self.chunks):
            raise ValueError(f"shards {self.shards} and chunks {self.chunks} must have the same number of dimensions")
        for shard, chunk in zip(self.shards, self.chunks, strict=True):
            if shard % chunk:
                raise ValueError(
                    f"shards {self.shards} must be whole multiples of chunks {self.chunks}; "
                    f"{shard} is not a multiple of {chunk}"
                )
        return self

    @property
    def write_unit(self) -> tuple[int, ...]:
        """The smallest independently writable block: the shard if sharded, else the chunk."""
        return self.shards if self.shards is not None else self.chunks

    def _checksum_codecs(self) -> tuple[Any, ...]:
        from zarr.codecs import Crc32cCodec

        return (Crc32cCodec(),) if self.checksum == "crc32c" else ()

    def to_xarray_encoding(self) -> dict[str, Any]:
        encoding: dict[str, Any] = {
            "dtype": self.dtype,
            "chunks": self.chunks,
            "compressors": (*(c.to_codec() for c in self.compressors), *self._checksum_codecs()),
        }
        if self.shards is not None:
            encoding["shards"] = self.shards
        if self.fill_value is not None:
            encoding["_FillValue"] = self.fill_value
        if self.units is not None:
            encoding["units"] = self.units
        if self.calendar is not None:
            encoding["calendar"] = self.calendar
        return encoding


class DataVarAttrs(FrozenModel):
    """CF attributes published on a data variable."""

    long_name: str
    short_name: str
    units: str
    step_type: Literal["instant", "accum", "avg", "max", "min"]
    standard_name: str | None = None
    comment: str | None = None
    cell_methods: str | None = None
    grid_mapping: str | None = None  # CF: the coordinate holding the CRS (projected grids)

    def to_attrs(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class BaseInternalAttrs(FrozenModel):
    """Processing settings that are not published. Subclass for source-specific fields."""

    keep_mantissa_bits: int | Literal["no-rounding"] = Field(...)
    deaccumulate_to_rate: bool = False
    window_reset_frequency: timedelta | None = None

    @field_validator("keep_mantissa_bits")
    @classmethod
    def _bits_in_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 23:
            raise ValueError(f"keep_mantissa_bits must be 1..23 for float32 or 'no-rounding', got {value}")
        return value


InternalAttrsT = TypeVar("InternalAttrsT", bound=BaseInternalAttrs)


class DataVar(FrozenModel, Generic[InternalAttrsT]):
    name: str
    encoding: Encoding
    attrs: DataVarAttrs
    internal_attrs: InternalAttrsT

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"data variable name {value!r} must be a valid identifier (letters, digits, _)")
        return value


class CoordinateAttrs(FrozenModel):
    units: str | None = None
    long_name: str | None = None
    standard_name: str | None = None
    axis: str | None = None
    comment: str | None = None
    statistics_approximate: dict[str, str | float | int] | None = None
    crs_wkt: str | None = None
    spatial_ref: str | None = None
    grid_mapping_name: str | None = None
    # CF grid-mapping parameters of projected grids (e.g. lambert_conformal_conic).
    standard_parallel: float | tuple[float, ...] | None = None
    longitude_of_central_meridian: float | None = None
    latitude_of_projection_origin: float | None = None
    false_easting: float | None = None
    false_northing: float | None = None
    earth_radius: float | None = None

    def to_attrs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Coordinate(FrozenModel):
    name: str
    encoding: Encoding
    attrs: CoordinateAttrs = CoordinateAttrs()


def latitude_longitude_coords(n_latitude: int, n_longitude: int) -> tuple[Coordinate, Coordinate]:
    """The 1-D `latitude` and `longitude` coordinates of a regular lat/lon grid, each stored as one chunk."""
    return (
        Coordinate(
            name="latitude",
            encoding=Encoding(dtype="float64", fill_value=float("nan"), chunks=(n_latitude,)),
            attrs=CoordinateAttrs(units="degrees_north", standard_name="latitude", axis="Y"),
        ),
        Coordinate(
            name="longitude",
            encoding=Encoding(dtype="float64", fill_value=float("nan"), chunks=(n_longitude,)),
            attrs=CoordinateAttrs(units="degrees_east", standard_name="longitude", axis="X"),
        ),
    )


def latitude_longitude_spatial_ref(wkt: str, comment: str) -> Coordinate:
    """The scalar CF grid-mapping coordinate `spatial_ref` of a regular lat/lon grid whose CRS is `wkt`."""
    return Coordinate(
        name="spatial_ref",
        encoding=Encoding(dtype="int64", fill_value=0, chunks=()),
        attrs=CoordinateAttrs(crs_wkt=wkt, spatial_ref=wkt, grid_mapping_name="latitude_longitude", comment=comment),
    )


class DatasetAttributes(FrozenModel):
    dataset_id: str
    dataset_version: str
    name: str
    description: str
    attribution: str
    spatial_domain: str
    spatial_resolution: str
    time_domain: str
    time_resolution: str
    forecast_domain: str | None = None
    forecast_resolution: str | None = None

    @field_validator("dataset_id")
    @classmethod
    def _id_is_slug(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c == "-" for c in value) or value != value.lower():
            raise ValueError(f"dataset_id {value!r} must be lower-case letters, digits and '-'")
        return value

    def to_attrs(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def unique_names(items: Sequence[DataVar[Any]] | Sequence[Coordinate]) -> None:
    names = [item.name for item in items]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"names must be unique, found duplicates: {', '.join(duplicated)}")
