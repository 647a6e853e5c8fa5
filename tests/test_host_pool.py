"""The pool of page-locked host blocks (kvsift/cache/host.py), with a fake register/unregister on
the CPU; the real one (cudaHostRegister) runs in the CUDA test at the end."""

import gc
import threading
import time

import pytest
import torch

from kvsift.budget import parse_bytes
from kvsift.cache.host import GRANULE, MIN_BYTES, HostPool
from kvsift.errors import InputError

MiB = 1 << 20


class FakeCuda:
    """Records register/unregister calls and device syncs; ``fail`` refuses registrations."""

    def __init__(self):
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.synced: list = []
        self.fail = False

    def register(self, ptr, nbytes):
        if self.fail:
            return False
        assert ptr not in self.registered
        self.registered[ptr] = nbytes
        return True

    def unregister(self, ptr):
        assert ptr in self.registered
        del self.registered[ptr]
        self.unregistered.append(ptr)

    def sync(self, device):
        self.synced.append(device)


def pool(limit=64 * MiB):
    fake = FakeCuda()
    return HostPool(limit, fake.register, fake.unregister, fake.sync), fake


def test_a_freed_block_is_reused_by_the_next_request_of_its_size():
    p, fake = pool()
    t = p.empty((4, MiB // 4), torch.float32, "cuda:0")          # 4 MiB
    t.fill_(1.0)
    ptr = t.data_ptr()
    assert t.shape == (4, MiB // 4) and t.dtype == torch.float32
    assert fake.registered == {ptr: 4 * MiB}
    del t
    st = p.stats()
    assert st["released"] == 1 and st["cached"] == 4 * MiB and st["in_use"] == 0
    u = p.empty((2 * MiB,), torch.bfloat16)                     # same bytes, another dtype and shape
    assert u.data_ptr() == ptr and u.dtype == torch.bfloat16 and u.numel() == 2 * MiB
    assert len(fake.registered) == 1 and not fake.unregistered  # nothing locked again
    assert fake.synced == [torch.device("cuda:0")]               # the last owner's device, before reuse
    st = p.stats()
    assert (st["hits"], st["misses"], st["in_use"], st["cached"]) == (1, 1, 4 * MiB, 0)


def test_reuse_waits_for_the_release_point_not_for_the_device():
    """A block is marked when its owner frees it (a CUDA event on the releasing thread's stream);
    the next owner waits for that mark alone, not for all the work queued on the device since (a
    device sync there drained the prefill's pipeline at every layer). Without a mark: the sync."""
    fake, marks, waited = FakeCuda(), [], []

    def mark(device):
        marks.append(device)
        return None if device is None else f"release {len(marks)}"

    p = HostPool(64 * MiB, fake.register, fake.unregister, fake.sync, mark, waited.append)
    t = p.empty((MiB,), torch.float32, "cuda:0")
    del t
    assert marks == [torch.device("cuda:0")]
    u = p.empty((MiB,), torch.float32, "cuda:0")
    assert waited == ["release 1"] and fake.synced == []
    ptr = u.data_ptr()
    del u
    v = p.empty((MiB,), torch.float32)                      # waits for its second release only
    assert v.data_ptr() == ptr and waited == ["release 1", "release 2"] and fake.synced == []
    del v                                                   # last owner named no device: no mark
    p.empty((MiB,), torch.float32)
    assert waited == ["release 1", "release 2"] and fake.synced == [None]


def test_sizes_round_to_granules_and_reuse_stays_within_the_slack():
    p, fake = pool()
    t = p.empty((3 * MiB + 8,), torch.uint8)
    assert list(fake.registered.values()) == [4 * MiB]          # 3 MiB + 8 B -> two granules
    assert GRANULE == 2 * MiB
    del t
    small = p.empty((MiB + 4,), torch.uint8)                    # 2 MiB block: the 4 MiB one is too big
    assert p.stats()["misses"] == 2 and len(fake.registered) == 2
    near = p.empty((4 * MiB - 4,), torch.uint8)                 # fits the cached 4 MiB block
    assert p.stats()["hits"] == 1
    assert small.numel() == MiB + 4 and near.numel() == 4 * MiB - 4


def test_small_tensors_are_not_pooled():
    p, fake = pool()
    assert p.empty((MIN_BYTES // 4 - 1,), torch.float32) is None
    assert not fake.registered


def test_a_view_keeps_the_block_in_use():
    p, _ = pool()
    t = p.empty((4, MiB), torch.uint8)
    v = t[1:]
    del t
    gc.collect()
    assert p.stats()["in_use"] == 4 * MiB
    v2 = p.empty((4, MiB), torch.uint8)                         # not the block the view still reads
    assert v2.data_ptr() != v.data_ptr() - MiB
    del v
    assert p.stats()["released"] == 1


def test_the_limit_bounds_what_stays_locked():
    p, fake = pool(limit=6 * MiB)
    a = p.empty((4 * MiB,), torch.uint8)
    b = p.empty((4 * MiB,), torch.uint8)                        # past the limit: never refused
    assert p.stats()["total"] == 8 * MiB
    del a, b
    st = p.stats()
    assert st["total"] == 4 * MiB and st["cached"] == 4 * MiB and len(fake.unregistered) == 1
    c = p.empty((6 * MiB,), torch.uint8)                        # no fit: the cached block makes room first
    assert len(fake.unregistered) == 2 and p.stats()["total"] == 6 * MiB
    del c
    p.set_limit(0)
    assert p.stats()["total"] == 0 and not fake.registered
    with pytest.raises(ValueError, match="limit"):
        p.set_limit(-1)


def test_limit_zero_caches_nothing_and_clear_frees_the_cache():
    p, fake = pool(limit=0)
    t = p.empty((2 * MiB,), torch.uint8)
    del t
    assert not fake.registered and p.stats()["cached"] == 0
    q, fake2 = pool()
    ts = [q.empty((2 * MiB,), torch.uint8) for _ in range(3)]
    del ts
    assert q.stats()["cached"] == 6 * MiB
    q.clear()
    assert not fake2.registered and q.stats()["total"] == 0


def test_a_refused_registration_returns_none():
    p, fake = pool()
    fake.fail = True
    assert p.empty((4 * MiB,), torch.uint8) is None
    assert p.stats()["total"] == 0


def test_a_block_released_inside_the_pool_is_queued_not_lost():
    """A tensor freed while the pool's lock is held (here: by the register callback, as a GC in
    another allocation could) is cached once the locked section ends."""
    fake = FakeCuda()
    held = {}

    def register(ptr, n):
        held.pop("t", None)          # the last view of an earlier block dies inside empty()
        return fake.register(ptr, n)

    p = HostPool(64 * MiB, register, fake.unregister, fake.sync)
    held["t"] = p.empty((2 * MiB,), torch.uint8)
    x = p.empty((8 * MiB,), torch.uint8)
    st = p.stats()
    assert st["released"] == 1 and st["cached"] == 2 * MiB and st["in_use"] == 8 * MiB
    del x


def test_blocks_released_from_other_threads():
    p, fake = pool(limit=256 * MiB)
    ts = [p.empty((2 * MiB,), torch.uint8) for _ in range(16)]

    def drop(i):
        ts[i] = None

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    st = p.stats()
    assert st["released"] == 16 and st["cached"] == 32 * MiB and st["in_use"] == 0
    again = [p.empty((2 * MiB,), torch.uint8) for _ in range(16)]
    assert p.stats()["hits"] == 16 and len(fake.registered) == 16
    del again


def test_parse_bytes():
    assert parse_bytes("512M") == 512 * MiB and parse_bytes("2G") == 2 << 30 and parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("1048576") == MiB and parse_bytes(7) == 7
    with pytest.raises(InputError, match="KVSIFT_HOST_POOL: expected a size"):
        parse_bytes("lots", what="KVSIFT_HOST_POOL")


def test_default_limit_from_the_environment(monkeypatch):
    from kvsift.budget import HOST_KV_SHARE, available_host_bytes
    from kvsift.cache import host

    monkeypatch.setenv("KVSIFT_HOST_POOL", "0")
    assert host._default_limit() == 0
    monkeypatch.setenv("KVSIFT_HOST_POOL", "3G")
    assert host._default_limit() == 3 << 30
    monkeypatch.delenv("KVSIFT_HOST_POOL")
    avail = available_host_bytes()
    assert avail > 0 and abs(host._default_limit() - int(avail * HOST_KV_SHARE)) <= avail // 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cudaHostRegister)")
def test_cuda_pool_blocks_are_pinned_and_reused():
    from kvsift.cache.host import pinned_empty

    dev = torch.device("cuda")
    p = HostPool(1 << 30)                                    # cudaHostRegister / cudaHostUnregister
    t = p.empty((3, 1 << 18), torch.float32, dev)
    assert t.is_pinned() and t.numel() == 3 << 18
    ptr = t.data_ptr()
    src = torch.arange(3 << 18, dtype=torch.float32, device=dev).view(3, -1)
    t.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(t, src.cpu())
    del t
    u = p.empty((3 << 18,), torch.float32, dev)              # the same block again, after a device sync
    assert u.data_ptr() == ptr and u.is_pinned() and p.stats()["hits"] == 1
    p.reserve([((2 << 20,), torch.uint8)]).result()
    assert p.empty((2 << 20,), torch.uint8, dev).is_pinned() and p.stats()["reserved"] == 1
    del u
    p.clear()
    assert p.stats()["cached"] == 0
    assert pinned_empty((1 << 20,), torch.float32, dev).is_pinned()   # the process pool's


def test_reserved_blocks_serve_the_later_allocations():
    p, fake = pool()
    shapes = [((MiB,), torch.bfloat16), ((MiB,), torch.bfloat16), ((MiB // 4,), torch.int32), ((10,), torch.int32)]
    p.reserve(shapes).result()
    assert p.stats()["reserved"] == 3 and len(fake.registered) == 3   # the 40-byte one is not pooled
    got = [p.empty(s, d, "cuda:0") for s, d in shapes[:3]]
    st = p.stats()
    assert (st["hits"], st["misses"], st["in_use"]) == (3, 0, 6 * MiB)
    assert fake.synced == [None] * 3                        # never used before: no device to wait for
    del got
    assert p.reserve(shapes[:2]) is None                    # cached blocks cover it: nothing to lock


def test_an_allocation_waits_for_the_reservation_locking_its_block():
    fake = FakeCuda()
    go = threading.Event()

    def slow(ptr, n):
        go.wait(5)
        return fake.register(ptr, n)

    p = HostPool(64 * MiB, slow, fake.unregister, fake.sync)
    fut = p.reserve([((4 * MiB,), torch.uint8)])
    threading.Timer(0.2, go.set).start()
    t = p.empty((4 * MiB,), torch.uint8)                    # waits for the worker's block, locks none itself
    assert fut.result() == 1 and t.numel() == 4 * MiB
    st = p.stats()
    assert (st["hits"], st["misses"], len(fake.registered)) == (1, 0, 1)


def test_reservations_stay_within_the_limit_and_survive_a_refusal():
    p, fake = pool(limit=8 * MiB)
    assert p.reserve([((4 * MiB,), torch.uint8)] * 3).result() == 2   # the third would pass the limit
    assert p.stats()["total"] == 8 * MiB
    q, fake2 = pool()
    fake2.fail = True
    assert q.reserve([((2 * MiB,), torch.uint8)] * 2).result() == 0
    assert q.stats()["total"] == 0 and q.empty((2 * MiB,), torch.uint8) is None   # no wait on a lost reservation


def test_an_allocation_stops_waiting_for_a_stuck_reservation(monkeypatch):
    from kvsift.cache import host

    monkeypatch.setattr(host, "RESERVE_WAIT_S", 0.2)
    fake = FakeCuda()
    go, calls = threading.Event(), []

    def first_blocks(ptr, n):
        calls.append(n)
        if len(calls) == 1:
            go.wait(5)        # the worker's registration hangs
        return fake.register(ptr, n)

    p = HostPool(64 * MiB, first_blocks, fake.unregister, fake.sync)
    fut = p.reserve([((4 * MiB,), torch.uint8)])
    while not calls:
        time.sleep(0.001)
    t = p.empty((4 * MiB,), torch.uint8)            # gives up after 0.2 s and locks its own block
    assert t.numel() == 4 * MiB and p.stats()["misses"] == 1
    go.set()
    assert fut.result() == 1
    st = p.stats()
    assert st["reserved"] == 1 and st["cached"] == 4 * MiB and st["in_use"] == 4 * MiB


def test_no_release_mark_inside_a_graph_capture(monkeypatch):
    """A block released while its device's stream records a CUDA graph (a finalizer the garbage
    collector runs there) gets no event, which would add work to the graph: its next owner syncs
    the device instead. Outside a capture it gets one on that stream."""
    import contextlib

    from kvsift.cache import host

    recorded = []

    class Event:
        def record(self, stream):
            recorded.append(stream)

    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream0")
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "Event", Event)
    assert host._mark(torch.device("cuda:0")) is None and recorded == []
    capturing[0] = False
    assert isinstance(host._mark(torch.device("cuda:0")), Event) and recorded == ["stream0"]
    assert host._mark(torch.device("cpu")) is None and host._mark(None) is None
