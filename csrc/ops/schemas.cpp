// Operator schemas of fusedrnn (the contract of every backend) and the Python module stub.
//
// One layer, one direction per call. Input is time-major (T, B, I) with batch_sizes None, or
// packed (sum(batch_sizes), I) with batch_sizes a 1-D int64 CPU tensor (non-increasing, as in
// torch's PackedSequence); step t then processes the first batch_sizes[t] rows of the state.
// `reverse` runs the steps from the last to the first. The workspace output holds what backward
// needs (activated gates, cell states, ...); its layout is private to the implementation. The
// forward ops' autograd is a C++ node (ops/autograd.cpp): when it records one (grad mode and an
// argument that requires a gradient) the workspace is always kept; otherwise only with
// need_workspace=True, and with need_workspace=False (inference) it is returned empty and the
// forward uses less memory.
// In backward, output_mask = (grad_input, weight gradients) says which of those to compute; the
// gradients of absent optional arguments, and the ones the mask leaves out, are returned as
// empty (0,) tensors. The state gradients are always computed.
// Zoneout (design.md §1.7; the plain and peephole LSTM without projection, and the GRU):
// zoneout_c and zoneout_h are the weights d of the previous cell / hidden state in the new one,
// d * prev + (1 - d) * new after every step, in input's dtype: (N, H) with a row per input row
// (training: 0 / 1 masks) or (1, H) (eval: the rate); the LSTM takes both or neither. The
// backward takes the forward's.
#include <Python.h>
#include <torch/library.h>

#include <cfenv>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "cells/traits.h"
#include "execution/buffer_pool.h"
#include "execution/gemm.h"
#include "execution/step_device.h"
#include "kernels/cpu/fused_step.h"
#include "kernels/cpu/isa.h"

extern "C" {
// `import fusedrnn._C` loads this library, whose static initialisers register the operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fusedrnn, m) {
  // LSTM family: lstm, peephole_lstm (weight_ch (3, H)), wm_lstm (weight_ch (3H, H)).
  // weight_hr (P, H) is the optional projection (proj_size P); then hx is (B, P).
  for (const fusedrnn::CellTraits& cell : fusedrnn::kCellTraits) {
    if (!cell.has_cell_state) continue;
    const std::string op(cell.name);
    m.def((op + "_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
                "Tensor? bias_hh, Tensor? weight_ch, Tensor? weight_hr, Tensor? hx, Tensor? cx, "
                "Tensor? batch_sizes, bool reverse, bool need_workspace=True, "
                "Tensor? zoneout_c=None, Tensor? zoneout_h=None) -> (Tensor output, "
                "Tensor hy, Tensor cy, Tensor workspace)")
              .c_str());
    m.def((op +
           "_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, "
           "Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
           "Tensor? weight_ch, Tensor? weight_hr, Tensor? hx, Tensor? cx, Tensor? batch_sizes, "
           "bool reverse, Tensor output, Tensor workspace, bool[2] output_mask, "
           "Tensor? zoneout_c=None, Tensor? zoneout_h=None) -> "
           "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, Tensor "
           "grad_weight_hh, "
           "Tensor grad_bias_ih, Tensor grad_bias_hh, Tensor grad_weight_ch, "
           "Tensor grad_weight_hr)")
              .c_str());
  }
  // The first-order gradients of a layer as a differentiable graph, for the node of
  // ops/autograd.cpp under create_graph=True: `grads` flow into the forward op's
  // differentiable outputs, `args` are its tensor arguments (batch_sizes last); one gradient per
  // argument, empty where `needs` is false. Its kernel is Python (fusedrnn/_ops.py): the
  // reference equations differentiated with create_graph=True.
  m.def(
      "_differentiable_backward(str cell, Tensor?[] grads, Tensor?[] args, bool reverse, "
      "bool[] needs) -> Tensor[]");
  m.def(
      "gru_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor? hx, Tensor? batch_sizes, bool reverse, "
      "bool need_workspace=True, Tensor? zoneout_h=None) -> (Tensor output, Tensor hy, "
      "Tensor workspace)");
  m.def(
      "gru_backward(Tensor? grad_output, Tensor? grad_hy, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? hx, Tensor? batch_sizes, "
      "bool reverse, Tensor output, Tensor workspace, bool[2] output_mask, "
      "Tensor? zoneout_h=None) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh)");
  // The layer-normalised LSTM and GRU (design.md §1.6; recurrence/layer_norm.cpp), CPU kernels:
  // the arguments of lstm / gru plus the LayerNorm gains ln_weight_ih, ln_weight_hh (4H or 3H)
  // and, for the LSTM, LN(c_t)'s ln_weight_c and ln_bias_c (H). The workspace is of the op-math
  // type (float32 for bfloat16 / float16 input); the backward reads it and not the output.
  // Their autograd is registered in Python (fusedrnn/_layer_norm.py). Zoneout as the lstm and
  // gru ops take it (zoneout_c / zoneout_h last; not with weight_hr).
  m.def(
      "layer_norm_lstm_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor ln_weight_ih, Tensor ln_weight_hh, Tensor ln_weight_c, "
      "Tensor ln_bias_c, Tensor? weight_hr, Tensor? hx, Tensor? cx, Tensor? batch_sizes, "
      "bool reverse, bool need_workspace=True, Tensor? zoneout_c=None, Tensor? zoneout_h=None) "
      "-> (Tensor output, Tensor hy, Tensor cy, Tensor workspace)");
  m.def(
      "layer_norm_lstm_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, "
      "Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
      "Tensor ln_weight_ih, Tensor ln_weight_hh, Tensor ln_weight_c, Tensor ln_bias_c, "
      "Tensor? weight_hr, Tensor? hx, Tensor? cx, Tensor? batch_sizes, bool reverse, "
      "Tensor workspace, bool[2] output_mask, Tensor? zoneout_c=None, Tensor? zoneout_h=None) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, "
      "Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh, Tensor grad_ln_weight_ih, "
      "Tensor grad_ln_weight_hh, "
      "Tensor grad_ln_weight_c, Tensor grad_ln_bias_c, Tensor grad_weight_hr)");
  m.def(
      "layer_norm_gru_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor ln_weight_ih, Tensor ln_weight_hh, Tensor? hx, "
      "Tensor? batch_sizes, bool reverse, bool need_workspace=True, Tensor? zoneout_h=None) "
      "-> (Tensor output, Tensor hy, Tensor workspace)");
  m.def(
      "layer_norm_gru_backward(Tensor? grad_output, Tensor? grad_hy, Tensor input, "
      "Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
      "Tensor ln_weight_ih, Tensor ln_weight_hh, Tensor? hx, Tensor? batch_sizes, bool reverse, "
      "Tensor workspace, bool[2] output_mask, Tensor? zoneout_h=None) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh, Tensor grad_ln_weight_ih, Tensor grad_ln_weight_hh)");
  // Zoneout's training masks on the CPU (ops/zoneout_mask.cpp): (rows, width) bool, True with
  // probability p, a function of `seed` (a one-element int64 tensor) and each element's index;
  // with a floating dtype, 1 / 0 of it.
  m.def(
      "zoneout_mask(SymInt rows, SymInt width, float p, Tensor seed, ScalarType? dtype=None) -> "
      "Tensor");
  // The facts of cells/traits.h of the cell named `cell`: [gates, weight_ch kind (0 none, 1
  // (3, H), 2 (3H, H)), has_cell_state, two_phase, workspace_cols, proj_cols], for the tests
  // that check fusedrnn/cells.py against them.
  m.def("_cell_traits(str cell) -> int[]", [](const std::string& name) {
    for (const fusedrnn::CellTraits& c : fusedrnn::kCellTraits) {
      if (name == c.name) {
        return std::vector<int64_t>{c.gates,          static_cast<int64_t>(c.weight_ch),
                                    c.has_cell_state, c.two_phase,
                                    c.workspace_cols, c.proj_cols};
      }
    }
    TORCH_CHECK(false, "_cell_traits: no cell named '", name, "'");
  });
  // How CPU calls run (fusedrnn.build_info()): whether fp32 calls run the fused GEMM + cell
  // steps (kernels/cpu/fused_step.h), the instruction set of the vectorised kernels in use and the
  // best one available (kernels/cpu/isa.h), and whether large fp32 / bf16 GEMMs go through oneDNN.
  m.def("cpu_fused_steps() -> bool", [] { return fusedrnn::cpu::fused_steps_available(); });
  m.def("cpu_isa() -> str",
        [] { return std::string(fusedrnn::cpu::isa_name(fusedrnn::cpu::current_isa())); });
  m.def("cpu_isa_best() -> str",
        [] { return std::string(fusedrnn::cpu::isa_name(fusedrnn::cpu::best_isa())); });
  m.def("cpu_onednn_gemm() -> bool", [] { return fusedrnn::driver::onednn_gemm_enabled(); });
  m.def("cpu_onednn_fp32_gemm() -> bool", [] { return fusedrnn::driver::onednn_fp32_gemm(); });
  // Switches the ISA in use, returning the previous one (the tests run the fused paths under
  // each ISA the machine has). Not thread-safe against concurrent layer calls: for tests.
  m.def("_set_cpu_isa(str isa) -> str",
        [](const std::string& isa) { return fusedrnn::cpu::set_isa(isa); });
  // Whether bf16 CPU layer calls run the fused tiles (kernels/cpu/isa.h), whether oneDNN's bf16
  // GEMMs may run on AMX (what "auto" decides on), and the switch the tests force the tiles with.
  m.def("cpu_bf16_tiles() -> bool", [] { return fusedrnn::cpu::bf16_tiles(); });
  // Forces the bf16 small GEMMs (AVX2's) where ATen's bf16 GEMM is oneDNN's, returning the
  // previous setting (execution/gemm.h): for tests.
  m.def("_set_bf16_small_gemms(bool force) -> bool",
        [](bool force) { return fusedrnn::driver::force_bf16_small_gemms(force); });
  // The pool of the layers' large CPU buffers (execution/buffer_pool.h): [limit, free bytes,
  // bytes in use], and the release of its free blocks (fusedrnn.empty_cpu_cache()).
  m.def("cpu_pool_stats() -> int[]", [] {
    const fusedrnn::PoolStats st = fusedrnn::cpu_pool_stats();
    return std::vector<int64_t>{st.limit, st.free, st.in_use};
  });
  m.def("cpu_pool_release() -> ()", [] { fusedrnn::cpu_pool_release(); });
  m.def("_cpu_pool_poison() -> ()", [] { fusedrnn::cpu_pool_poison(); });
  m.def("cpu_onednn_bf16_amx() -> bool", [] { return fusedrnn::cpu::onednn_bf16_amx(); });
  m.def("_set_cpu_bf16_tiles(str mode) -> str",
        [](const std::string& mode) { return fusedrnn::cpu::set_bf16_tiles(mode); });
  // Whether floating-point arithmetic on the calling thread met a denormal (an operand, or a
  // result that underflowed) since the flags were last cleared, clearing them if asked: the
  // tests run a layer call between two of these to show that no step kernel computes with
  // denormals from ordinary states, not even in vector lanes it then discards (cells/common.h,
  // exp's clamp). x86: MXCSR's DE and UE flags; elsewhere the underflow flag of <cfenv>.
  m.def("_cpu_denormal_flags(bool clear) -> bool", [](bool clear) {
#if defined(__x86_64__) || defined(__i386__)
    constexpr unsigned kDenormalOperand = 0x02, kUnderflow = 0x10;
    const unsigned csr = _mm_getcsr();
    if (clear) _mm_setcsr(csr & ~(kDenormalOperand | kUnderflow));
    return (csr & (kDenormalOperand | kUnderflow)) != 0;
#else
    const bool raised = std::fetestexcept(FE_UNDERFLOW) != 0;
    if (clear) std::feclearexcept(FE_UNDERFLOW);
    return raised;
#endif
  });
  // The raw GEMM of the step loops (execution/step_device.h), for the tests: c = beta * c +
  // op(a) op(b) on the buffers of c, a and b read as row-major matrices with the given leading
  // dimensions; on CUDA tensors the cuBLAS call the loops make. And how the step GEMMs of
  // calls on tensors like `like` run: "cpu", "cublas", or "aten: <reason>".
  m.def(
      "_raw_gemm(Tensor(a!) c, Tensor a, Tensor b, int m, int n, int k, int lda, int ldb, "
      "int ldc, bool trans_a, bool trans_b, float beta) -> ()",
      &fusedrnn::driver::raw_gemm_op);
  m.def("_gemm_backend(Tensor like) -> str", &fusedrnn::driver::gemm_backend);
}
