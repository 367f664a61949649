"""Cache blocking: how the fused ops make several NumPy passes cost about one.

Each NumPy ufunc call reads and writes whole arrays. An op written as k such calls over an
activation of, say, (B, T, 4C) numbers streams it through memory k times; when the array is
larger than the CPU's cache, that traffic, not the arithmetic, sets the time. A fused kernel
(a CUDA kernel, or PyTorch's compiled GELU) makes one pass and keeps the intermediate values in
registers. NumPy cannot do that, but it can come close: run the same k calls on one block of
``BLOCK_ELEMENTS`` numbers at a time, so that the block and its temporaries stay in cache
between the calls, and only the first read and the last write of each block go to memory.

The blocks are whole rows (for ops along the last axis: softmax, layer norm, a bias), so each
row's statistics are computed inside one block. On a GPU the library's kernels already work
this way and every call costs a launch, so there the whole array is one block.
"""
from minipar.backend import ON_DEVICE

BLOCK_ELEMENTS = 1 << 16  # 64 Ki numbers (256 KiB in fp32): a block and 2 temporaries fit a 1-2 MiB L2;
# on the 2-core development machine (2.5 MiB L2) GELU's forward took 0.73 ms in blocks of 64 Ki, 0.78 ms
# in 32 Ki and 1.26 ms unblocked, on (12, 64, 512) fp32 (the machine shared, so roughly)


def row_blocks(rows, width):
    """Slices of consecutive rows, about ``BLOCK_ELEMENTS`` numbers each (at least one row)."""
    if ON_DEVICE:
        return [slice(0, rows)]
    step = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
