// The row bookkeeping of a recurrence: which rows each step runs (padded or packed input,
// either direction), where each step's previous state comes from, and the chunks of steps the
// backward keeps its per-row gradients for.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "execution/buffer_pool.h"

namespace fusedrnn {
namespace driver {

using at::Tensor;

// Row layout of the steps: step t owns rows [off[t], off[t] + n[t]) of the input, the output and
// the workspace, and processes rows [0, n[t]) of the state.
struct Steps {
  int64_t T = 0, B = 0, N = 0;
  std::vector<int64_t> n, off;
  bool reverse = false;
  // time index of the k-th processed step
  int64_t at(int64_t k) const { return reverse ? T - 1 - k : k; }
};

// Checks the input (and batch_sizes) of op and lays out its steps.
Steps make_steps(const char* op, const Tensor& input, const std::optional<Tensor>& batch_sizes,
                 bool reverse);

// Where the state before each step comes from, for the weight gradients of the recurrent and
// cell-connection matrices (sums over all rows of grad^T @ prev_state). Row r of step t has as
// previous state the previous processed step's saved row r if that step ran row r, else the
// initial state's row r. Segments map rows [dst, dst + count) of the step-ordered row space to
// rows [src, src + count) of the saved sequence (from_init false) or of the initial state;
// adjacent segments are merged, so a padded sequence has just two.
struct PrevSegment {
  int64_t dst, count, src;
  bool from_init;
};

// The previous processed step of step t's rows: (row count taken from it, its first row);
// count 0 for the first processed step.
std::pair<int64_t, int64_t> prev_rows(const Steps& s, int64_t k);

std::vector<PrevSegment> prev_segments(const Steps& s);

// The segments of rows [lo, hi) of the row space, renumbered from 0.
std::vector<PrevSegment> clip_segments(const std::vector<PrevSegment>& segs, int64_t lo,
                                       int64_t hi);

// The (N, width) matrix of previous states, materialised only where the segments are many
// (packed sequences with many distinct lengths).
Tensor gather_prev(const std::vector<PrevSegment>& segs, const Tensor& seq, const Tensor& init,
                   int64_t N);

// The backward loops keep the per-row gradients that the weight gradients need (dgates) for a
// chunk of consecutive processed steps at a time, fp32 / fp64 on the CPU (other dtypes would
// round each chunk's partial weight gradients): a chunk's part of the input and weight gradients
// is computed, accumulated, when it is done, while it is still in cache, and its buffers are
// reused two chunks later (the next chunk's first step reads the previous chunk's last rows).
// Less memory, fewer fresh pages to fault in. Otherwise one chunk holds every step.
constexpr int64_t kBackwardChunkRows = 1024;

struct StepChunks {
  struct Chunk {
    int64_t k_lo, lo, hi;  // the chunk's last processed step; its rows [lo, hi)
    int buf;               // which of the two buffers holds it
  };
  std::vector<Chunk> chunks;
  std::vector<int64_t> chunk_of;  // the chunk of each processed step
  int64_t buf_rows = 0;

  // The chunks of the fused cells' backward: kBackwardChunkRows rows (at least a step's) on the
  // CPU in fp32 / fp64, else one chunk of every step.
  StepChunks(const Steps& s, const Tensor& input)
      : StepChunks(s, input.device().is_cpu() && (input.scalar_type() == at::kFloat ||
                                                  input.scalar_type() == at::kDouble)
                          ? std::max<int64_t>(kBackwardChunkRows, s.B)
                          : s.N) {}
  // Chunks of consecutive processed steps of at most `cap` rows (a step of more rows is a chunk
  // of its own).
  StepChunks(const Steps& s, int64_t cap) : chunk_of(s.T) {
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = s.at(k), lo = s.off[t], hi = lo + s.n[t];
      if (chunks.empty() || std::max(hi, chunks.back().hi) - std::min(lo, chunks.back().lo) > cap) {
        chunks.push_back({k, lo, hi, static_cast<int>(chunks.size() % 2)});
      } else {
        Chunk& c = chunks.back();
        c.k_lo = k;
        c.lo = std::min(lo, c.lo);
        c.hi = std::max(hi, c.hi);
      }
      chunk_of[k] = static_cast<int64_t>(chunks.size()) - 1;
    }
    for (const Chunk& c : chunks) buf_rows = std::max(buf_rows, c.hi - c.lo);
  }
  // Buffer `which` (0 or 1) of `width` columns; undefined when there is no second chunk.
  Tensor buffer(int64_t width, const at::TensorOptions& opts, int which) const {
    if (which == 1 && chunks.size() < 2) return Tensor();
    return pooled_empty({buf_rows, width}, opts);
  }
  const Chunk& of(int64_t k) const { return chunks[chunk_of[k]]; }
  // rows [r, r + count) of a per-row buffer pair, for a row r of processed step k
  Tensor rows_of(const Tensor (&bufs)[2], int64_t k, int64_t r, int64_t count) const {
    const Chunk& c = of(k);
    return bufs[c.buf].narrow(0, r - c.lo, count);
  }
  // The same row as a pointer, from the buffers' data pointers (`width` elements a row).
  template <typename T>
  T* row_ptr(T* const (&bases)[2], int64_t width, int64_t k, int64_t r) const {
    const Chunk& c = of(k);
    return bases[c.buf] + (r - c.lo) * width;
  }
};

}  // namespace driver
}  // namespace fusedrnn
