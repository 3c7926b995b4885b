"""Dataset integrations, installed as the import package `reformatters_datasets`.

Each folder is one provider/model/variant. `reformatters list` shows the datasets declared as entry points
of the group `reformatters.datasets` (pyproject.toml); `example` is declared by no entry point: the tests
register it through `REFORMATTERS_EXTRA_DATASETS` (see `reformatters.registry`).
"""
