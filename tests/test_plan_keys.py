"""Stage 1 keeps no key list for a dataset with a shard index: :class:`cache.plan.DatasetKeys` reads the
keys from the index's flat arrays on demand (issue #29, "stage 1 keeps keys as a Python list")."""

from __future__ import annotations

import pytest

from tipsdistill.cache.format import keys_digest, shard_range
from tipsdistill.cache.plan import DatasetKeys, _dataset_keys
from tipsdistill.cache.shard_index import ShardIndex
from tipsdistill.scripts.bench_cache import synthetic_index


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> ShardIndex:
    path = tmp_path_factory.mktemp("keys") / "index"
    synthetic_index(path, 2_345, per_shard=1_000)  # 3 shards, the last one short
    return ShardIndex.load(path)


def test_index_keys_read_on_demand_equal_the_key_list(index, monkeypatch):
    every = [index.key(i) for i in range(len(index))]
    assert every[999] == "00000/000000999" and every[1000] == "00001/000000000"
    monkeypatch.setattr(DatasetKeys, "CHUNK", 700)  # iteration crosses shard and chunk borders
    keys = _dataset_keys(index)
    assert isinstance(keys, DatasetKeys) and len(keys) == len(every)
    assert list(keys) == every and keys_digest(keys) == keys_digest(every)
    for world in (1, 3, 8):  # each rank's slice, as ShardPlan.shard_keys takes it
        for rank in range(world):
            start, count = shard_range(len(every), rank, world)
            assert keys[start : start + count] == every[start : start + count]
    assert keys[1500] == every[1500] and keys[-1] == every[-1] and keys[990:1010:7] == every[990:1010:7]
    assert keys[2000:10] == [] and keys[2300:] == every[2300:]
    with pytest.raises(IndexError, match="key 2345 of a dataset of 2345"):
        keys[2345]


def test_datasets_without_an_index_keep_their_key_list():
    class Keyed:
        def __len__(self) -> int:
            return 3

        def keys(self) -> list[str]:
            return ["a", "b", "c"]

    class Plain:
        def __len__(self) -> int:
            return 2

    assert _dataset_keys(Keyed()) == ["a", "b", "c"]
    assert _dataset_keys(Plain()) == ["0", "1"]
