// Zoneout's training masks (design.md §1.7) on the CPU: `zoneout_mask(rows, width, p, seed,
// dtype=None)`, a (rows, width) bool tensor, True with probability p, from one seed that torch's
// generator draws (fusedrnn.reference.zoneout_masks), so that torch.manual_seed fixes it. With a
// floating dtype the same masks as 1 / 0 of that dtype: the weights the fused ops take, written
// once instead of drawn as bool and converted (a pass over the mask, 2-3% of a training pass).
//
// Each element is a function of the seed and its index alone (a counter-based draw): no state
// is carried from one element to the next, so the rows are split among threads and the result
// is the same for every thread count. torch.rand(rows, width) < p, the masks' first form, took
// 4-5 ns an element on one core here and did not get faster with more (one generator, one
// thread): at T = 100, B = 64, H = 256 an LSTM's two masks were 6-10% of its training pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "execution/buffer_pool.h"

namespace fusedrnn {
namespace {

// SplitMix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number
// generators", 2014) of the seed plus the counter times the golden-ratio increment: the
// generator SplitMix64 itself, read at a counter, which passes BigCrush. Two 32-bit draws an
// evaluation.
inline uint64_t draw(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Element k of the masks (draw k / 2, its low or high 32 bits) into o[k], for k in [0, n). A
// floating T stores one of two values picked by the comparison (an int-to-float conversion per
// element ran at a third of the bool masks' speed).
template <typename T>
void fill_mask(T* o, int64_t n, uint64_t key, uint64_t threshold) {
  const T value[2] = {static_cast<T>(0), static_cast<T>(1)};
  const int64_t pairs = n / 2;
  at::parallel_for(0, pairs, int64_t(1) << 15, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const uint64_t r = draw(key, static_cast<uint64_t>(k));
      o[2 * k] = value[(r & 0xFFFFFFFFULL) < threshold];
      o[2 * k + 1] = value[(r >> 32) < threshold];
    }
  });
  if (n % 2)
    o[n - 1] = value[(draw(key, static_cast<uint64_t>(pairs)) & 0xFFFFFFFFULL) < threshold];
}

at::Tensor zoneout_mask(int64_t rows, int64_t width, double p, const at::Tensor& seed,
                        std::optional<at::ScalarType> dtype) {
  const char* op = "fusedrnn::zoneout_mask";
  TORCH_CHECK(rows >= 0 && width >= 0, op, ": rows and width must be >= 0, got ", rows, " and ",
              width);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(),
              " of shape ", seed.sizes(), " on ", seed.device());
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  // An element is kept when its 32-bit draw u < p 2^32: probability floor(p 2^32) / 2^32, within
  // 2^-32 of p (p = 1: always).
  const uint64_t threshold = static_cast<uint64_t>(std::ldexp(p, 32));
  const at::ScalarType type = dtype.value_or(at::kBool);
  TORCH_CHECK(type == at::kBool || type == at::kFloat || type == at::kDouble ||
                  type == at::kBFloat16 || type == at::kHalf,
              op, ": dtype must be None (bool), float32, float64, bfloat16 or float16, got ", type);
  at::Tensor out = pooled_empty({rows, width}, at::TensorOptions().dtype(type));
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBool, at::kBFloat16, at::kHalf, type, "zoneout_mask", [&] {
    fill_mask(out.data_ptr<scalar_t>(), rows * width, key, threshold);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { m.impl("zoneout_mask", &zoneout_mask); }

}  // namespace fusedrnn
