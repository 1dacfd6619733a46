// What the rest of the library knows of each cell, in one table (and, at the end, the list of the
// cells' math headers): its op name, gate blocks, the
// shape of its cell-connection weight, the columns of its workspace and how its step runs. The
// argument checks (ops/args.cpp), the workspace layouts (recurrence/buffers.h, recurrence/gru.cpp),
// the op schemas and registrations (ops/schemas.cpp, ops/register.cpp) read it; the Python side has
// the same facts in fusedrnn/cells.py, which tests/test_cells.py checks against this table
// through the `_cell_traits` op. Plain constexpr C++: also compiled into the CUDA and the per-ISA
// units. Adding a cell: see csrc/cells/README.md.
#ifndef FUSEDRNN_CELLS_TRAITS_H
#define FUSEDRNN_CELLS_TRAITS_H

#include <cstdint>

namespace fusedrnn {

enum class CellKind : int { kLSTM = 0, kPeephole = 1, kWorkingMemory = 2, kGRU = 3 };
constexpr int kNumCells = 4;

// The cell-connection weight `weight_ch` of a cell of hidden size H.
enum class WeightCh : int {
  kNone = 0,      // none: the argument must be None
  kDiagonal = 1,  // (3, H): the peepholes w_ci, w_cf, w_co
  kFull = 2,      // (3H, H): the working-memory matrices W_ci; W_cf; W_co
};

struct CellTraits {
  CellKind kind;
  const char* name;  // the op family: "<name>_forward" / "<name>_backward"
  int gates;         // gate blocks of weight_ih / weight_hh rows (gates * H rows)
  WeightCh weight_ch;
  bool has_cell_state;  // an LSTM-family cell (c_t, the op's cx / cy)
  bool two_phase;       // the step runs as Phase::kIFG then kO (a GEMM of c_t in between)
  // The workspace a training forward keeps for the backward: per input row,
  // workspace_cols * H + (with a projection) proj_cols * H values.
  int workspace_cols;
  int proj_cols;
};

// Indexed by CellKind. The LSTM family's workspace: gates 4H, c H, [r H with a projection],
// [u 3H for the working-memory cell] (recurrence/buffers.h); the GRU's: r, z, n, h_n (4H).
constexpr CellTraits kCellTraits[kNumCells] = {
    {CellKind::kLSTM, "lstm", 4, WeightCh::kNone, true, false, 5, 1},
    {CellKind::kPeephole, "peephole_lstm", 4, WeightCh::kDiagonal, true, false, 5, 1},
    {CellKind::kWorkingMemory, "wm_lstm", 4, WeightCh::kFull, true, true, 8, 1},
    {CellKind::kGRU, "gru", 3, WeightCh::kNone, false, false, 4, 0},
};

constexpr const CellTraits& traits(CellKind cell) { return kCellTraits[static_cast<int>(cell)]; }

// Whether the training workspace keeps the cell connections' tanh outputs u (3H a row): the
// full working-memory connections do (their backward reads them), the diagonal peepholes do not.
constexpr bool keeps_connection_outputs(CellKind cell) {
  return traits(cell).weight_ch == WeightCh::kFull;
}

// Rows of weight_ch for hidden size H (its columns are H); 0 when the cell has none.
constexpr int64_t weight_ch_rows(CellKind cell, int64_t H) {
  switch (traits(cell).weight_ch) {
    case WeightCh::kDiagonal:
      return 3;
    case WeightCh::kFull:
      return 3 * H;
    case WeightCh::kNone:
      break;
  }
  return 0;
}

// Values per input row of the workspace of a training forward.
constexpr int64_t workspace_row(CellKind cell, int64_t H, bool proj) {
  return H * (traits(cell).workspace_cols + (proj ? traits(cell).proj_cols : 0));
}

constexpr bool indexed_by_kind() {
  for (int i = 0; i < kNumCells; ++i) {
    if (static_cast<int>(kCellTraits[i].kind) != i) return false;
  }
  return true;
}
static_assert(indexed_by_kind(), "kCellTraits must be indexed by CellKind");

}  // namespace fusedrnn

#endif  // FUSEDRNN_CELLS_TRAITS_H

// The cells' math headers, included where the step elements are compiled
// (kernels/step_elements.h defines FUSEDRNN_CELL_MATH and includes this file again). Outside
// the include guard on purpose: the table above is included early by code compiled once, but
// the math must be compiled after a per-ISA unit has switched its target (kernels/cpu/isa/
// isa_begin.h), so it is included only on request. Each header declares its CellMath<kind>.
#if defined(FUSEDRNN_CELL_MATH) && !defined(FUSEDRNN_CELL_MATH_INCLUDED)
#define FUSEDRNN_CELL_MATH_INCLUDED
#include "gru.h"
#include "lstm.h"
#include "peephole_lstm.h"
#include "wm_lstm.h"
#endif
