"""The caching-allocator emulation against hand-computed cases (rules of c10/cuda/CUDACachingAllocator.cpp)."""

import pytest

from autobatch.allocator import CachingAllocator, round_size, segment_size

MiB = 2**20


@pytest.mark.parametrize(("size", "rounded"), [(0, 512), (1, 512), (512, 512), (513, 1024), (4 * MiB + 1, 4 * MiB + 512)])
def test_requests_round_to_512_bytes(size, rounded):
    assert round_size(size) == rounded


@pytest.mark.parametrize(("size", "segment"), [
    (512, 2 * MiB), (MiB, 2 * MiB),  # small pool: 2 MiB segments
    (MiB + 512, 20 * MiB), (10 * MiB - 512, 20 * MiB),  # large under 10 MiB: 20 MiB segments
    (10 * MiB, 10 * MiB), (11 * MiB, 12 * MiB), (100 * MiB + 1, 102 * MiB),  # larger: rounded up to 2 MiB
])
def test_segment_sizes(size, segment):
    assert segment_size(round_size(size)) == segment


def test_small_requests_share_one_2mib_segment():
    heap = CachingAllocator()
    handles = [heap.malloc(1000) for _ in range(4096)]  # 4096 × 1024 B = 4 MiB: two segments exactly
    assert (heap.reserved_bytes, heap.allocated_bytes, heap.segments) == (4 * MiB, 4 * MiB, 2)
    for handle in handles:
        heap.free(handle)
    assert (heap.reserved_bytes, heap.allocated_bytes) == (4 * MiB, 0)  # cached, never given back in a step


def test_large_requests_split_a_20mib_segment_and_reuse_freed_blocks():
    heap = CachingAllocator()
    a, b, c = (heap.malloc(6 * MiB) for _ in range(3))  # 6 + 6 in one 20 MiB segment (8 left), then 6 more
    assert heap.reserved_bytes == 20 * MiB and heap.segments == 1  # 18 MiB used, 2 MiB left > 1 MiB: split
    d = heap.malloc(3 * MiB)  # 2 MiB remainder too small: a new 20 MiB segment
    assert heap.reserved_bytes == 40 * MiB
    heap.free(b)
    e = heap.malloc(5 * MiB)  # best fit: the freed 6 MiB block, not the 17 MiB tail of the second segment
    assert heap.reserved_bytes == 40 * MiB
    assert heap.allocated_bytes == (6 + 6 + 6 + 3) * MiB  # a 1 MiB remainder is not split off: e holds all 6
    for handle in (a, c, d, e):
        heap.free(handle)
    assert heap.allocated_bytes == 0 and heap.peak_reserved_bytes == 40 * MiB
    heap.malloc(20 * MiB)  # the first segment merged back whole: no new segment
    assert heap.reserved_bytes == 40 * MiB


def test_large_remainder_of_1mib_or_less_is_not_split():
    heap = CachingAllocator()
    heap.malloc(19 * MiB)  # over 10 MiB: its own segment of 20 MiB (rounded to 2 MiB), 1 MiB left unsplit
    assert heap.allocated_bytes == 20 * MiB and heap.reserved_bytes == 20 * MiB


def test_freed_neighbours_merge_so_a_larger_request_fits():
    heap = CachingAllocator()
    a, b = heap.malloc(4 * MiB), heap.malloc(4 * MiB)
    heap.malloc(4 * MiB)
    heap.free(a)
    heap.free(b)
    heap.malloc(8 * MiB)  # a and b merged: 8 MiB at the segment's start
    assert heap.segments == 1 and heap.reserved_bytes == 20 * MiB
    heap.malloc(8 * MiB)  # 8 MiB tail left after three 4 MiB blocks: fits exactly
    assert heap.segments == 1
    heap.malloc(512)  # the small pool never uses a large block
    assert heap.segments == 2 and heap.reserved_bytes == 22 * MiB
