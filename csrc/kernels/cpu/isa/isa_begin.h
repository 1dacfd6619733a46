// Opens a per-ISA translation unit (through unit_avx2.h, unit_avx512.h, unit_avx512_bf16.h);
// isa_end.h closes it. The unit header defines FUSEDRNN_ISA_NAMESPACE and FUSEDRNN_ISA_TARGET (a
// target attribute string), then includes this header and defines `Vec`; the unit then includes
// what it compiles for the ISA (fused_tiles.h, fused_table.h, step_loops.h, layer_norm_rows.h)
// and isa_end.h.
//
// Only the code between the two headers is compiled for the ISA, through the compiler's target
// pragma, not through command-line flags: the unit compiles with the same flags as the rest of the
// library, the headers of the standard library, c10 and ATen are included here first (their inline
// code and templates, at::parallel_for and c10::BFloat16's conversions included, are compiled for
// the baseline, as everywhere else: a template takes the target of its definition), and what
// follows lives in the ISA's own namespace (cells/common.h). So nothing compiled for AVX2 or
// AVX-512 can be the linker's choice for portable code, and nothing of it runs at load time (the
// kernel table is constant- initialised).
#ifndef FUSEDRNN_ISA_NAMESPACE
#error "define FUSEDRNN_ISA_NAMESPACE before including isa_begin.h"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// gcc 12 warns (-Wmaybe-uninitialized) inside its own AVX-512 intrinsics wherever an unmasked
// one is inlined (_mm512_slli_epi32, _mm512_cvtepu16_epi32, _mm512_max_ps, ...): they pass an
// "undefined" vector written as a self-initialisation (gcc bug 105593, fixed in gcc 13), about
// 3,000 warnings a build. The warning is off for those headers only, whose state at their own
// lines is what gcc consults (nothing includes them before this header).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define FUSEDRNN_DO_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define FUSEDRNN_TARGET_PUSH(t) \
  FUSEDRNN_DO_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
FUSEDRNN_TARGET_PUSH(FUSEDRNN_ISA_TARGET)
#elif defined(__GNUC__)
#define FUSEDRNN_TARGET_PUSH(t) FUSEDRNN_DO_PRAGMA(GCC target(t))
#pragma GCC push_options
FUSEDRNN_TARGET_PUSH(FUSEDRNN_ISA_TARGET)
#endif
