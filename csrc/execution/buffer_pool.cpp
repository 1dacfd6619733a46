#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace fusedrnn {
namespace {

int64_t limit_from_env() {
  const char* env = std::getenv("FUSEDRNN_CPU_POOL_MB");
  if (env == nullptr || *env == '\0') return kDefaultPoolMB << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
              "fusedrnn: FUSEDRNN_CPU_POOL_MB must be a whole number of megabytes >= 0, got '", env,
              "'");
  return static_cast<int64_t>(mb) << 20;
}

// One block: its memory and size, the deleter's context while a tensor holds it.
struct Block {
  void* ptr;
  size_t size;
};

class BufferPool final : public c10::Allocator {
 public:
  explicit BufferPool(int64_t limit) : limit_(limit) {}

  int64_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t n) override {
    // Whole pages, so that calls whose sizes differ a little share blocks.
    const size_t size = (n + kPage - 1) / kPage * kPage;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest free block that fits and wastes at most a quarter of itself.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first - size <= it->first / 4) {
        block = it->second;
        free_bytes_ -= static_cast<int64_t>(block->size);
        in_use_ += static_cast<int64_t>(block->size);
        free_.erase(it);
      }
    }
    if (block == nullptr) {
      block = new Block{c10::alloc_cpu(size), size};  // (alloc_cpu throws when out of memory)
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ += static_cast<int64_t>(size);
    }
    report(block->ptr, static_cast<int64_t>(block->size));
    return {block->ptr, block, &BufferPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, free_bytes_, in_use_};
  }

  void poison_free() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, block] : free_) std::memset(block->ptr, 0xff, size);
  }

  void release_free() {
    std::multimap<size_t, Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      free_bytes_ = 0;
    }
    for (auto& [size, block] : blocks) destroy(block);
  }

 private:
  static constexpr size_t kPage = 4096;

  static void release(void* ctx);

  void give_back(Block* block) {
    report(block->ptr, -static_cast<int64_t>(block->size));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= static_cast<int64_t>(block->size);
      if (free_bytes_ + static_cast<int64_t>(block->size) <= limit_) {
        free_.emplace(block->size, block);
        free_bytes_ += static_cast<int64_t>(block->size);
        return;
      }
    }
    destroy(block);
  }

  static void destroy(Block* block) {
    c10::free_cpu(block->ptr);
    delete block;
  }

  // As PyTorch's CPU allocator reports its blocks to the profiler (profile_memory).
  void report(void* ptr, int64_t delta) {
    int64_t in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use = in_use_;
      reserved = in_use_ + free_bytes_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(in_use),
                                     static_cast<size_t>(reserved),
                                     c10::Device(c10::DeviceType::CPU));
  }

  const int64_t limit_;
  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;
  int64_t free_bytes_ = 0;
  int64_t in_use_ = 0;
};

// Never destroyed: tensors may release their blocks during the process's exit.
BufferPool& pool() {
  static BufferPool* const p = new BufferPool(limit_from_env());
  return *p;
}

void BufferPool::release(void* ctx) { pool().give_back(static_cast<Block*>(ctx)); }

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (opts.device().type() != c10::DeviceType::CPU || opts.requires_grad() ||
      opts.layout() != c10::kStrided ||
      (opts.has_memory_format() &&
       opts.memory_format_opt().value() != c10::MemoryFormat::Contiguous) ||
      opts.pinned_memory() || pool().limit() == 0) {
    return at::empty(sizes, opts);
  }
  const int64_t bytes =
      c10::multiply_integers(sizes) * static_cast<int64_t>(opts.dtype().itemsize());
  if (bytes < kPooledMinBytes) return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), std::nullopt);
}

at::Tensor pooled_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return pooled_empty(sizes, opts).zero_();
}

PoolStats cpu_pool_stats() { return pool().stats(); }

void cpu_pool_release() { pool().release_free(); }

void cpu_pool_poison() { pool().poison_free(); }

}  // namespace fusedrnn
