from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from reformatters.common.binary_rounding import max_relative_rounding_error, round_float32_inplace
from reformatters.common.config_models import BaseInternalAttrs, DataVar, DataVarAttrs, Encoding
from reformatters.common.deaccumulation import deaccumulate_along_axis
from reformatters.common.time_utils import TimezoneError, parse_utc


def test_naive_time_means_utc_and_z_is_accepted() -> None:
    assert parse_utc("2025-01-31T06:00") == pd.Timestamp("2025-01-31T06:00")
    assert parse_utc("2025-01-31T06:00Z") == pd.Timestamp("2025-01-31T06:00")
    assert parse_utc("2025-01-31T06:00+00:00") == pd.Timestamp("2025-01-31T06:00")


def test_other_offsets_are_refused_with_the_utc_instant() -> None:
    with pytest.raises(TimezoneError, match=r"UTC offset.*2025-01-31T04:00:00"):
        parse_utc("2025-01-31T06:00+02:00")
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        parse_utc("yesterday-ish")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-31", "2025-01-31T00:00"),
        ("2025-01-31T06", "2025-01-31T06:00"),
        ("2025-01-31T06:30:15", "2025-01-31T06:30:15"),
        ("2025-01-31T06:30:15.25Z", "2025-01-31T06:30:15.25"),
    ],
)
def test_iso_8601_dates_and_times_are_accepted(text: str, expected: str) -> None:
    assert parse_utc(text) == pd.Timestamp(expected)


@pytest.mark.parametrize("text", ["01/02/2025", "Jan 5 2025", "now", "today", "2025-01-31 06:00", "20250131", "2025"])
def test_anything_but_iso_8601_is_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"not an ISO 8601 time; write a date or a date and time, e\.g\. 2025-01-31"):
        parse_utc(text)


def test_an_impossible_date_is_refused() -> None:
    with pytest.raises(ValueError, match="'2025-02-30' is not a valid time"):
        parse_utc("2025-02-30")


def test_encoding_refuses_shards_that_split_chunks() -> None:
    with pytest.raises(ValidationError, match="whole multiples of chunks"):
        Encoding(dtype="float32", fill_value=float("nan"), chunks=(1, 105), shards=(1, 200))
    with pytest.raises(ValidationError, match="same number of dimensions"):
        Encoding(dtype="float32", fill_value=float("nan"), chunks=(1, 105), shards=(1,))
    with pytest.raises(ValidationError):
        Encoding(dtype="not-a-dtype", fill_value=0, chunks=(1,))


def test_models_are_frozen_and_strict() -> None:
    encoding = Encoding(dtype="float32", fill_value=float("nan"), chunks=(2,), shards=(4,))
    with pytest.raises(ValidationError):
        encoding.chunks = (3,)  # type: ignore[misc]
    with pytest.raises(ValidationError, match="keep_mantissa_bits"):
        BaseInternalAttrs(keep_mantissa_bits=30)
    with pytest.raises(ValidationError, match="valid identifier"):
        DataVar[BaseInternalAttrs](
            name="2m temperature",
            encoding=encoding,
            attrs=DataVarAttrs(long_name="x", short_name="x", units="K", step_type="instant"),
            internal_attrs=BaseInternalAttrs(keep_mantissa_bits=7),
        )


@pytest.mark.parametrize("bits", [4, 7, 10, 16, 22])
def test_binary_rounding_error_is_bounded_and_half_to_even(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = (rng.standard_normal(100_000) * 300).astype(np.float32)
    rounded = round_float32_inplace(values.copy(), bits)
    relative = np.abs(rounded.astype(np.float64) - values) / np.abs(values.astype(np.float64))
    assert relative.max() <= max_relative_rounding_error(bits)
    # Rounded values use only the kept mantissa bits.
    assert not np.any(rounded.view(np.uint32) & np.uint32((1 << (23 - bits)) - 1))
    # Exact ties go to the even neighbour: 1 + 2^-(bits+1) lies halfway between 1 and 1 + 2^-bits.
    tie = np.array([1 + 2.0 ** -(bits + 1)], dtype=np.float32)
    assert round_float32_inplace(tie, bits)[0] == 1.0


def test_binary_rounding_keeps_nan_and_inf() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 3.3], dtype=np.float32)
    rounded = round_float32_inplace(values, 7)
    assert np.isnan(rounded[0]) and rounded[1] == np.inf and rounded[2] == -np.inf


def test_binary_rounding_finds_a_lone_value_among_missing_ones() -> None:
    values = np.full((3, 400, 700), np.nan, dtype=np.float32)
    values[1, 399, 699] = np.float32(3.3)
    expected = round_float32_inplace(np.array([3.3], dtype=np.float32), 7)[0]
    round_float32_inplace(values, 7)
    assert values[1, 399, 699] == expected != np.float32(3.3)
    assert np.isnan(values).sum() == values.size - 1


def test_deaccumulation_with_six_hour_window_restarts() -> None:
    leads = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], dtype=float)
    rate = np.linspace(1e-4, 3e-4, len(leads)).astype(np.float32)  # kg m-2 s-1 over (h-1, h]
    accumulated = np.zeros(len(leads), dtype=np.float32)
    for i, hour in enumerate(leads):
        if hour == 0:
            continue
        start = ((hour - 1) // 6) * 6
        accumulated[i] = sum(rate[int(h)] * 3600 for h in range(int(start) + 1, int(hour) + 1))
    values = accumulated.copy()[:, None]
    deaccumulate_along_axis(values, leads, 0, "accumulation", 6)
    assert np.isnan(values[0, 0])
    np.testing.assert_allclose(values[1:, 0], rate[1:], rtol=1e-4)


def test_deaccumulation_of_window_averages_and_missing_previous_step() -> None:
    leads = np.array([0, 3, 6, 9, 12], dtype=float)
    step_average = np.array([np.nan, 100.0, 200.0, 300.0, 400.0], dtype=np.float32)
    window_average = np.array([np.nan, 100.0, 150.0, 300.0, 350.0], dtype=np.float32)
    values = window_average.copy()[:, None]
    deaccumulate_along_axis(values, leads, 0, "average", 6)
    np.testing.assert_allclose(values[1:, 0], step_average[1:], rtol=1e-6)
    window_average[3] = np.nan  # lead 9 missing: lead 12 (not a window's first step) cannot be computed
    values = window_average.copy()[:, None]
    deaccumulate_along_axis(values, leads, 0, "average", 6)
    assert np.isnan(values[4, 0]) and values[2, 0] == pytest.approx(200.0)


@pytest.mark.parametrize("kind", ["accumulation", "average"])
def test_deaccumulation_of_present_steps_leaves_the_others_unread_and_unwritten(kind: str) -> None:
    """`present`: steps without a field hold garbage (a scratch file's holes read as zeros) and stay as they are;
    the present ones come out as they do when the missing steps are NaN."""
    leads = np.array([0, 3, 6, 9, 12, 15, 18], dtype=float)
    rng = np.random.default_rng(3)
    fields = (rng.random((leads.size, 2, 3)) * 10).astype(np.float32)
    present = np.array([True, True, False, True, True, False, True])
    dense = fields.copy()
    dense[~present] = np.nan
    deaccumulate_along_axis(dense, leads, 0, kind, 6)  # type: ignore[arg-type]
    sparse = fields.copy()
    sparse[~present] = 0.0
    deaccumulate_along_axis(sparse, leads, 0, kind, 6, present=present)  # type: ignore[arg-type]
    np.testing.assert_array_equal(sparse[present], dense[present])
    assert (sparse[~present] == 0.0).all()
    # 9 h begins a window (computed without 6 h); 18 h follows the missing 15 h in its window (NaN).
    assert not np.isnan(dense[3]).any() and np.isnan(dense[6]).all()


def test_clearly_negative_rates_become_nan_and_are_counted() -> None:
    leads = np.array([0, 1, 2], dtype=float)
    values = np.array([[0.0, 0.0], [3.6, 3.6], [3.6 - 1e-6, 0.0]], dtype=np.float32)
    negatives = deaccumulate_along_axis(values, leads, 0, "accumulation", None)
    assert negatives == 1
    assert values[2, 0] == 0.0  # packing noise clamps to zero
    assert np.isnan(values[2, 1])


def test_a_dataset_can_start_later_on_its_own_grid_only() -> None:
    from reformatters_datasets.example.dataset import ExampleDataset

    dataset = ExampleDataset()
    later = dataset.starting_at("2024-01-02T06:00")
    template = later.template_config.get_template("2024-01-03T00:00")
    assert template.get_index("init_time")[0] == pd.Timestamp("2024-01-02T06:00")
    assert template.sizes["init_time"] == 3
    assert dataset.template_config.append_dim_start == pd.Timestamp("2024-01-01T00:00"), "the original is unchanged"
    with pytest.raises(ValueError, match="not on the dataset's grid"):
        dataset.starting_at("2024-01-02T03:00")
    with pytest.raises(ValueError, match="not on the dataset's grid"):
        dataset.starting_at("2023-12-31T18:00")


def _deaccumulate_reference(
    values: np.ndarray, leads: np.ndarray, kind: str, reset_hours: float | None
) -> tuple[np.ndarray, int]:
    """The formulas of deaccumulate_along_axis, one whole step at a time with temporaries (axis 0)."""
    from reformatters.common.deaccumulation import NEGATIVE_RATE_TOLERANCE, window_start

    out = np.full_like(values, np.nan)
    negatives = 0
    for i in range(1, len(leads)):
        hour, previous_hour = float(leads[i]), float(leads[i - 1])
        start = window_start(hour, reset_hours)
        step = hour - previous_hour
        first = previous_hour <= start
        current, previous = values[i], values[i - 1]
        if kind == "accumulation":
            result = (current if first else current - previous) / np.float32(step * 3600)
            with np.errstate(invalid="ignore"):
                clearly = result < NEGATIVE_RATE_TOLERANCE
                negatives += int(clearly.sum())
                result = np.where(clearly, np.nan, np.where(result < 0, 0, result))
        else:
            result = (
                current
                if first
                else (current * np.float32(hour - start) - previous * np.float32(previous_hour - start))
                / np.float32(step)
            )
        out[i] = result
    return out.astype(np.float32), negatives


@pytest.mark.parametrize("kind", ["accumulation", "average"])
@pytest.mark.parametrize("reset_hours", [6, None])
def test_deaccumulation_matches_its_formulas_with_missing_fields_and_noise(kind: str, reset_hours: int | None) -> None:
    rng = np.random.default_rng(7)
    leads = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 18], dtype=float)
    values = np.cumsum(rng.uniform(0, 2, size=(len(leads), 5, 8)), axis=0).astype(np.float32)
    values[4] = values[3] - np.float32(5e-7)  # packing noise: a tiny negative step
    values[5, 0, 0] -= 50  # a clearly negative one
    values[7] = np.nan  # a missing field: lead 8 cannot be computed either
    values[10, 2, 3] = np.nan  # one missing point
    expected, expected_negatives = _deaccumulate_reference(values, leads, kind, reset_hours)
    # The function works on a strided view of a bigger buffer, along axis 1, as the pipeline calls it.
    buffer = np.full((2, len(leads), 6, 9), -1.0, dtype=np.float32)
    buffer[1, :, :5, :8] = values
    negatives = deaccumulate_along_axis(buffer[1, :, :5, :8], leads, 0, kind, reset_hours)  # type: ignore[arg-type]
    np.testing.assert_array_equal(buffer[1, :, :5, :8], expected)
    assert negatives == expected_negatives
    assert (buffer[0] == -1).all() and (buffer[1, :, 5:, :] == -1).all() and (buffer[1, :, :, 8:] == -1).all()
    assert np.isnan(buffer[1, 7, :5, :8]).all() and np.isnan(buffer[1, 0, :5, :8]).all()


def test_holds_only_nan_agrees_with_a_full_isnan_on_views_with_data_around_them() -> None:
    from reformatters.common.arrays import holds_only_nan

    rng = np.random.default_rng(3)
    buffer = np.full((3, 12, 20), np.nan, dtype=np.float32)
    view = buffer[1, :10, :16]  # a field inside its padded buffer: short gaps between rows
    assert holds_only_nan(view)
    buffer[1, 4, 18] = 1.0  # in a gap: the contiguous span sees it, the view does not
    assert holds_only_nan(view)
    buffer[0, 11, 19] = buffer[2, 0, 0] = 2.0  # just outside the span
    assert holds_only_nan(view)
    cases = [view, view[::-1], view.T, buffer[:, 2:5, 3:9], buffer[1], buffer[1, :, 5], np.empty((0, 3))]
    for _ in range(40):
        candidate = np.full((3, 12, 20), np.nan, dtype=np.float32)
        for _ in range(rng.integers(0, 3)):
            candidate[tuple(rng.integers(0, n) for n in candidate.shape)] = rng.normal()
        cases += [candidate[1, :10, :16], candidate[:, 1:11, 2:18], candidate[1, 1:-1, 1:-1]]
    for case in cases:
        assert holds_only_nan(case) == bool(np.isnan(case).all()), case.shape
