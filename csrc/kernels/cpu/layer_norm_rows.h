// The row loops of the layer-normalised cells' steps over the rows [b0, b1) of a step, and their
// table `kLayerNormKernels`. Included once per instruction set, in namespace
// fusedrnn::cpu::FUSEDRNN_ISA_NAMESPACE (recurrence/layer_norm.cpp: portable;
// isa/avx2_layer_norm.cpp, isa/avx512_layer_norm.cpp), as step_loops.h is.
#pragma once

#include <type_traits>

#include "kernels/layer_norm_elements.h"
#include "layer_norm_table.h"

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

// Zoneout is fixed per step at compile time in the row functions (cells/layer_norm.h, kZone):
// each loop below runs with kZone = kOn when the step zones its states (p.zone_h set), kOff when
// it zones none, and (kCellOnly_: the LSTM's) kCellOnly when it zones c_t only (p.zone_c set:
// a projected LSTM).
template <bool kCellOnly_, typename scalar_t, typename Fn>
void with_zone(const LNStep<scalar_t>& p, const Fn& fn) {
  if (p.zone_h != nullptr) {
    fn(std::integral_constant<int, kOn>{});
  } else if (kCellOnly_ && p.zone_c != nullptr) {
    if constexpr (kCellOnly_) fn(std::integral_constant<int, kCellOnly>{});
  } else {
    fn(std::integral_constant<int, kOff>{});
  }
}

// fn(std::bool_constant<p.keep>): a training step's forward or an inference step's.
template <typename scalar_t, typename Fn>
void with_keep(const LNStep<scalar_t>& p, const Fn& fn) {
  if (p.keep) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Row b's part of the first `blocks` workspace blocks of a training step p asked into the cache
// (the L2) while the row before it runs, and in bf16 its row of the input product, which is
// not the block x̂ then. These hold every row of the call (the workspace ~100 MB at T=100 B=64
// H=256), a row's part of a block a few KiB; the hardware's prefetchers, which stop at every
// 4 KiB page, left each row's first reads to wait for memory (perf: a fifth of the LN-LSTM
// forward's row pass on the loads of its x W_ih^T row). The forward's row writes the blocks
// (but x̂ in fp32, the input product itself), the backward reads them. An inference step's
// blocks and input product are a few rows in cache. (Inlined where it is called: a function of
// prefetches only, gcc finds it free of side effects and drops the calls.)
template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_row(const LNStep<scalar_t>& p, int blocks,
                                                        int64_t b) {
  using acc_t = typename LNStep<scalar_t>::acc_t;
  for (int k = 0; k < blocks; ++k) {
    const acc_t* const q = p.block(k, p.r0 + b);
    for (int64_t i = 0; i < p.width[k]; i += 64 / sizeof(acc_t)) __builtin_prefetch(q + i, 1, 2);
  }
  if (!std::is_same_v<scalar_t, acc_t> && p.xp != nullptr) {
    const scalar_t* const x = p.xp + b * p.width[0];
    for (int64_t i = 0; i < p.width[0]; i += 64 / sizeof(scalar_t)) __builtin_prefetch(x + i, 0, 2);
  }
}

// Rows [b0, b1) of step p, one after the other (kernels/layer_norm_elements.h), each prefetching
// the next one's workspace.
template <typename scalar_t>
void ln_lstm_forward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<true>(p, [&](auto zone) {
    with_keep(p, [&](auto keep) {
      constexpr bool kKeep = decltype(keep)::value;
      for (int64_t b = b0; b < b1; ++b) {
        if (kKeep && b + 1 < b1) prefetch_row(p, kLSTMStats + 1, b + 1);
        layer_norm::lstm_forward_of<decltype(zone)::value, kKeep>(layer_norm::SerialRow{}, p, b);
      }
    });
  });
}

template <typename scalar_t>
void ln_lstm_backward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<true>(p, [&](auto zone) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b + 1 < b1) prefetch_row(p, kLSTMStats + 1, b + 1);
      layer_norm::lstm_backward_of<decltype(zone)::value>(layer_norm::SerialRow{}, p, b);
    }
  });
}

template <typename scalar_t>
void ln_gru_forward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<false>(p, [&](auto zone) {
    with_keep(p, [&](auto keep) {
      constexpr bool kKeep = decltype(keep)::value;
      for (int64_t b = b0; b < b1; ++b) {
        if (kKeep && b + 1 < b1) prefetch_row(p, kGRUStats + 1, b + 1);
        layer_norm::gru_forward_of<decltype(zone)::value, kKeep>(layer_norm::SerialRow{}, p, b);
      }
    });
  });
}

template <typename scalar_t>
void ln_gru_backward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<false>(p, [&](auto zone) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b + 1 < b1) prefetch_row(p, kGRUStats + 1, b + 1);
      layer_norm::gru_backward_of<decltype(zone)::value>(layer_norm::SerialRow{}, p, b);
    }
  });
}

template <typename T>
constexpr LayerNormFns<T> ln_fns() {
  return {&ln_lstm_forward_rows<T>, &ln_lstm_backward_rows<T>, &ln_gru_forward_rows<T>,
          &ln_gru_backward_rows<T>};
}

constexpr LayerNormKernels kLayerNormKernels = {ln_fns<float>(), ln_fns<double>(),
                                                ln_fns<c10::BFloat16>(), ln_fns<c10::Half>()};

}  // namespace FUSEDRNN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedrnn
