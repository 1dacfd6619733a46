#include "steps.h"

namespace fusedrnn {
namespace driver {

Steps make_steps(const char* op, const Tensor& input, const std::optional<Tensor>& batch_sizes,
                 bool reverse) {
  Steps s;
  s.reverse = reverse;
  if (batch_sizes.has_value()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(input.dim() == 2, op,
                ": with batch_sizes, input must be packed 2-D (sum(batch_sizes), input_size), got ",
                input.dim(), "-D input of shape ", input.sizes());
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op,
                ": batch_sizes must be a 1-D int64 CPU tensor, got ", bs.dim(), "-D ",
                bs.scalar_type(), " on ", bs.device());
    auto bs_c = bs.contiguous();
    const int64_t* p = bs_c.data_ptr<int64_t>();
    s.T = bs_c.numel();
    s.n.resize(s.T);
    s.off.resize(s.T);
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(p[t] > 0, op, ": batch_sizes must be positive, got batch_sizes[", t,
                  "] = ", p[t]);
      TORCH_CHECK(t == 0 || p[t] <= p[t - 1], op,
                  ": batch_sizes must be non-increasing, got batch_sizes[", t - 1, "] = ", p[t - 1],
                  " followed by ", p[t]);
      s.n[t] = p[t];
      s.off[t] = total;
      total += p[t];
    }
    TORCH_CHECK(total == input.size(0), op, ": sum(batch_sizes) = ", total,
                " must equal input.size(0) = ", input.size(0));
    s.B = s.T > 0 ? s.n[0] : 0;
    s.N = total;
  } else {
    TORCH_CHECK(input.dim() == 3, op,
                ": input must be 3-D (seq_len, batch, input_size) when batch_sizes is None, got ",
                input.dim(), "-D input of shape ", input.sizes());
    s.T = input.size(0);
    s.B = input.size(1);
    s.N = s.T * s.B;
    s.n.assign(s.T, s.B);
    s.off.resize(s.T);
    for (int64_t t = 0; t < s.T; ++t) s.off[t] = t * s.B;
  }
  return s;
}

std::pair<int64_t, int64_t> prev_rows(const Steps& s, int64_t k) {
  if (k == 0) return {0, 0};
  const int64_t t = s.at(k), tp = s.at(k - 1);
  return {std::min(s.n[t], s.n[tp]), s.off[tp]};
}

std::vector<PrevSegment> prev_segments(const Steps& s) {
  std::vector<PrevSegment> segs;
  auto push = [&](int64_t dst, int64_t count, int64_t src, bool from_init) {
    if (count <= 0) return;
    if (!segs.empty()) {
      PrevSegment& last = segs.back();
      if (last.from_init == from_init && last.dst + last.count == dst &&
          last.src + last.count == src) {
        last.count += count;
        return;
      }
    }
    segs.push_back({dst, count, src, from_init});
  };
  // Walk the steps in row order (time order), which is the order of `dst`.
  std::vector<int64_t> k_of_t(s.T);
  for (int64_t k = 0; k < s.T; ++k) k_of_t[s.at(k)] = k;
  for (int64_t t = 0; t < s.T; ++t) {
    const auto [m, src] = prev_rows(s, k_of_t[t]);
    push(s.off[t], m, src, false);
    push(s.off[t] + m, s.n[t] - m, m, true);
  }
  return segs;
}

// The segments of rows [lo, hi) of the row space, renumbered from 0.
std::vector<PrevSegment> clip_segments(const std::vector<PrevSegment>& segs, int64_t lo,
                                       int64_t hi) {
  std::vector<PrevSegment> out;
  for (const PrevSegment& g : segs) {
    const int64_t a = std::max(g.dst, lo), b = std::min(g.dst + g.count, hi);
    if (a < b) out.push_back({a - lo, b - a, g.src + (a - g.dst), g.from_init});
  }
  return out;
}

Tensor gather_prev(const std::vector<PrevSegment>& segs, const Tensor& seq, const Tensor& init,
                   int64_t N) {
  Tensor prev = at::empty({N, init.size(1)}, init.options());
  for (const PrevSegment& g : segs) {
    prev.narrow(0, g.dst, g.count).copy_((g.from_init ? init : seq).narrow(0, g.src, g.count));
  }
  return prev;
}

}  // namespace driver
}  // namespace fusedrnn
