"""Checked-in templates, one `DATASET_ID/latest.zarr` each; installed as the package `reformatters.templates`."""
