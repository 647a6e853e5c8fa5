"""The thin cache: in-place appends, eviction helpers, clone and serialization, byte accounting."""

import torch

from kvsift.cache import SiftCache


def filled_cache(n=10, b=1, h=2, d=4, layers=2):
    cache = SiftCache(layers, capacity_hint=n + 4, reserve=4)
    cache.step_positions = torch.arange(n, dtype=torch.int32).expand(b, n)
    for layer in cache.layers:
        k = torch.randn(b, h, n, d)
        layer.update(k, k + 1)
    cache.seen = n
    return cache


def test_update_writes_in_place_without_realloc():
    cache = filled_cache()
    layer = cache.layers[0]
    buf = layer.k_buf.data_ptr()
    cache.step_positions = torch.tensor([[10]], dtype=torch.int32)
    layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert layer.k_buf.data_ptr() == buf and layer.length == 11
    assert layer.positions[0, 0, -1] == 10


def test_keep_and_replace_oldest():
    cache = filled_cache()
    layer = cache.layers[0]
    keys = layer.keys.clone()
    idx = torch.tensor([[[0, 1, 7, 9], [0, 2, 3, 9]]])
    layer.keep(idx)
    assert layer.length == 4
    torch.testing.assert_close(layer.keys[0, 1, 1], keys[0, 1, 2])
    assert layer.positions[0, 1].tolist() == [0, 2, 3, 9]
    cache.step_positions = torch.tensor([[10]], dtype=torch.int32)
    layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    layer.replace_oldest(4, protect_below=1)  # position 0 is a sink: the oldest other goes
    assert sorted(layer.positions[0, 0].tolist()) == [0, 7, 9, 10]
    assert sorted(layer.positions[0, 1].tolist()) == [0, 3, 9, 10]


def test_clone_and_state_dict_roundtrip():
    cache = filled_cache()
    twin = cache.clone(batch_repeat=3)
    assert twin.layers[1].keys.shape[0] == 3 and twin.seen == cache.seen
    torch.testing.assert_close(twin.layers[1].keys[2], cache.layers[1].keys[0])
    back = SiftCache.from_state_dict(cache.state_dict(), 2, cache.seen)
    for a, b in zip(cache.layers, back.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
        assert torch.equal(a.positions, b.positions)


def test_memory_counts_allocations_and_host_stores():
    cache = filled_cache(n=10, layers=1)
    mem = cache.memory()
    assert mem["device"] == (2 * 14 * 2 * 4) * 4 + 14 * 2 * 4  # k+v fp32 + int32 positions, 14 slots
    assert mem["device_used"] == 2 * 10 * 2 * 4 * 4 and mem["host"] == 0

    class Store:
        def nbytes(self):
            return (0, 1000)

    cache.layers[0].state["store"] = Store()
    assert cache.memory()["host"] == 1000
