"""An emulation of PyTorch's CUDA caching allocator: reserved bytes from a sequence of mallocs and frees.

Pure Python, no torch: the estimate backend feeds it every storage a step allocates and frees, in order, and
reads `peak_reserved_bytes`, the figure `torch.cuda.max_memory_reserved()` reports on the card. The rules are
those of c10/cuda/CUDACachingAllocator.cpp with the default `PYTORCH_CUDA_ALLOC_CONF` (one stream, no
`max_split_size_mb`, no expandable segments, no garbage-collection threshold):

- `round_size`: every request is rounded up to a multiple of `kMinBlockSize` (512 B); 0 B becomes 512 B.
- Two pools: sizes ≤ `kSmallSize` (1 MiB) come from the small pool, the rest from the large pool.
- `get_allocation_size`: a new segment (one cudaMalloc) is `kSmallBuffer` (2 MiB) for a small request,
  `kLargeBuffer` (20 MiB) for a large one under `kMinLargeAlloc` (10 MiB), else the size rounded up to
  `kRoundLarge` (2 MiB).
- `get_free_block`: the best fit, the smallest cached free block of the pool at least as large (ties to the
  lower address: the pool is ordered by (size, address)).
- `should_split`: the block is split when the remainder is ≥ 512 B (small pool) or > 1 MiB (large pool); the
  request takes the front, the remainder goes back to the pool.
- `free_block`: a freed block merges with free neighbours of its own segment and returns to its pool; the
  segment stays reserved (cudaFree happens only on `empty_cache()` or when a cudaMalloc fails, neither of which
  an estimate does: reserved only grows during a step).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK_SIZE = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: largest "small" request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: segment size of the small pool
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segment size for large requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge: larger requests get a segment of their size rounded to 2 MiB

#: What an estimate reports it assumed about the allocator (the plan's `allocator` entry).
SETTINGS = {
    "name": "CUDA caching allocator (emulated)", "round_bytes": MIN_BLOCK_SIZE, "small_pool_max_bytes": SMALL_SIZE,
    "small_segment_bytes": SMALL_BUFFER, "large_segment_bytes": LARGE_BUFFER, "large_round_bytes": ROUND_LARGE,
    "expandable_segments": False, "max_split_size_mb": None,
}


def round_size(size: int) -> int:
    """The bytes a request of `size` really takes (CUDACachingAllocator.cpp `round_size`)."""
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    return MIN_BLOCK_SIZE * -(-size // MIN_BLOCK_SIZE)


def segment_size(size: int) -> int:
    """The cudaMalloc made when no cached block fits a rounded request (`get_allocation_size`)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


@dataclass(eq=False)
class _Block:
    address: int
    size: int
    small: bool
    free: bool = True
    prev: _Block | None = field(default=None, repr=False)
    next: _Block | None = field(default=None, repr=False)

    def key(self) -> tuple[int, int]:
        return (self.size, self.address)


class CachingAllocator:
    """Blocks, pools and segments as the caching allocator keeps them; addresses are virtual."""

    def __init__(self) -> None:
        self._pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # sorted (size, address) of free blocks
        self._blocks: dict[int, _Block] = {}  # by address: every block, free or not
        self._handles: dict[int, _Block] = {}
        self._next_handle = 0
        self._top = 0  # the next segment's virtual address
        self.reserved_bytes = 0
        self.allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.peak_allocated_bytes = 0
        self.segments = 0

    def malloc(self, size: int) -> int:
        """Allocate `size` bytes; returns a handle for `free`."""
        size = round_size(size)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small) or self._new_segment(size, small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK_SIZE if small else remaining > SMALL_SIZE:
            tail = _Block(block.address + size, remaining, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._blocks[tail.address] = tail
            self._insert(tail)
        block.free = False
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = block
        return handle

    def free(self, handle: int) -> None:
        """Give a block back to its pool, merged with free neighbours; the segment stays reserved."""
        block = self._handles.pop(handle)
        self.allocated_bytes -= block.size
        block.free = True
        del self._blocks[block.address]
        before, after = block.prev, block.next
        if before is not None and before.free:  # try_merge_blocks with the block below
            self._remove(before)
            del self._blocks[before.address]
            block.address, block.size, block.prev = before.address, block.size + before.size, before.prev
            if before.prev is not None:
                before.prev.next = block
        if after is not None and after.free:  # and with the block above
            self._remove(after)
            del self._blocks[after.address]
            block.size, block.next = block.size + after.size, after.next
            if after.next is not None:
                after.next.prev = block
        self._blocks[block.address] = block
        self._insert(block)

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        pool = self._pools[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        _, address = pool.pop(index)
        return self._blocks[address]

    def _new_segment(self, size: int, small: bool) -> _Block:
        total = segment_size(size)
        block = _Block(self._top, total, small)
        self._top += total
        self._blocks[block.address] = block
        self.reserved_bytes += total
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        self.segments += 1
        return block

    def _insert(self, block: _Block) -> None:
        bisect.insort(self._pools[block.small], block.key())

    def _remove(self, block: _Block) -> None:
        pool = self._pools[block.small]
        del pool[bisect.bisect_left(pool, block.key())]
