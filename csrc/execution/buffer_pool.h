// The CPU memory of the layers' large tensors, kept for the next call.
//
// A training step of a layer allocates megabytes that it frees again before the next step: the
// outputs, the workspace the forward keeps for the backward, the backward's scratch and gradients.
// glibc serves such blocks with fresh pages from the system each time (mmap above its threshold;
// below it, heap memory that it returns to the system whenever the top of the heap is free), and
// every fresh page costs a page fault and the kernel's zeroing on first touch. An LSTM bf16
// training step at T=100, B=16, H=128 spent ~20% of its time there (440 page faults per step on
// an AMD Zen 4 core; 7.5 instead of 9.6 ms with glibc told to keep its memory).
//
// pooled_empty allocates such tensors from a pool of blocks that their release returns to it
// (an ordinary tensor otherwise: any op, resize, autograd, serialisation). The pool keeps at most
// FUSEDRNN_CPU_POOL_MB megabytes of free blocks (default kDefaultPoolMB; 0: no pool, every call
// plain at::empty); a block released beyond that is freed. Allocations and releases are reported
// to the profiler as the CPU allocator's are, so profile_memory counts them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fusedrnn {

constexpr int64_t kDefaultPoolMB = 512;
// Blocks below this size are left to the system allocator (its small bins do not fault).
constexpr int64_t kPooledMinBytes = int64_t{256} << 10;

// at::empty(sizes, opts), its memory from the pool where opts is a contiguous CPU tensor's of at
// least kPooledMinBytes.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts);
// pooled_empty, zero-filled.
at::Tensor pooled_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts);

// The pool's limit (bytes of free blocks kept) and what it holds now: free bytes, bytes in use.
struct PoolStats {
  int64_t limit = 0, free = 0, in_use = 0;
};
PoolStats cpu_pool_stats();
// Frees every free block of the pool.
void cpu_pool_release();
// Fills every free block with 0xff bytes (NaN in every float type): the tests' proof that no
// call reads a pooled buffer before writing it, as fresh pages (zeros) would hide.
void cpu_pool_poison();

}  // namespace fusedrnn
