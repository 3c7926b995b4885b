"""The example dataset with the replicas listed as JSON in REPLICA_TEST_DATASET_REPLICAS (each a `Replica`'s
fields), for runs through the CLI: REFORMATTERS_EXTRA_DATASETS=tests.replica_dataset:ReplicaExampleDataset."""

from __future__ import annotations

import json
import os
from typing import Any

from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.replicas import Replica

REPLICAS_ENV = "REPLICA_TEST_DATASET_REPLICAS"
EXTRA_DATASETS = "tests.replica_dataset:ReplicaExampleDataset"


def replicas_env(*replicas: Replica) -> dict[str, str]:
    return {
        REPLICAS_ENV: json.dumps([replica.model_dump() for replica in replicas]),
        "REFORMATTERS_EXTRA_DATASETS": EXTRA_DATASETS,
    }


class ReplicaExampleDataset(ExampleDataset):
    def __init__(self, **kwargs: Any) -> None:
        declared = json.loads(os.environ.get(REPLICAS_ENV) or "[]")
        kwargs.setdefault("replicas", tuple(Replica(**fields) for fields in declared))
        super().__init__(**kwargs)
