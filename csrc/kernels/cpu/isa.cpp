#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

namespace fusedrnn {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // __builtin_cpu_supports checks that the OS saves the registers too (XCR0).
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // F for the kernels; BW, VL and DQ as well, the set every AVX-512 CPU since Skylake-SP has
  // and the one ATen's oneDNN paths require (gemm.cpp relies on it).
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool parse(const std::string& name, Isa& out) {
  if (name == "baseline") {
    out = Isa::kBaseline;
  } else if (name == "avx2") {
    out = Isa::kAVX2;
  } else if (name == "avx512") {
    out = Isa::kAVX512;
  } else {
    return false;
  }
  return true;
}

std::string supported_list() {
  std::string s = "baseline";
  if (best_isa() >= Isa::kAVX2) s += ", avx2";
  if (best_isa() >= Isa::kAVX512) s += ", avx512";
  return s;
}

Isa checked(const std::string& name, const char* source) {
  Isa isa = Isa::kBaseline;
  TORCH_CHECK_VALUE(parse(name, isa), "fusedrnn: ", source,
                    " must be one of baseline, avx2, avx512, got '", name, "'");
  TORCH_CHECK_VALUE(
      isa <= best_isa(), "fusedrnn: ", source, "=", name,
      " asks for an instruction set that this CPU (or this build) does not have; available here: ",
      supported_list());
  return isa;
}

std::atomic<int> g_isa{-1};
std::mutex g_mutex;

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kBaseline:
      return "baseline";
    case Isa::kAVX2:
      return "avx2";
    case Isa::kAVX512:
      return "avx512";
  }
  return "?";
}

Isa best_isa() {
  static const Isa best = [] {
    if (fused_kernels_avx512() != nullptr && cpu_has_avx512()) return Isa::kAVX512;
    if (fused_kernels_avx2() != nullptr && cpu_has_avx2()) return Isa::kAVX2;
    return Isa::kBaseline;
  }();
  return best;
}

Isa current_isa() {
  int v = g_isa.load(std::memory_order_acquire);
  if (v >= 0) return static_cast<Isa>(v);
  std::lock_guard<std::mutex> lock(g_mutex);
  v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("FUSEDRNN_CPU_ISA");
    const Isa isa = env && *env ? checked(env, "FUSEDRNN_CPU_ISA") : best_isa();
    v = static_cast<int>(isa);
    g_isa.store(v, std::memory_order_release);
  }
  return static_cast<Isa>(v);
}

std::string set_isa(const std::string& name) {
  const Isa isa = checked(name, "the ISA");
  const std::string previous = isa_name(current_isa());
  g_isa.store(static_cast<int>(isa), std::memory_order_release);
  return previous;
}

const FusedStepKernels* fused_kernels() {
  switch (current_isa()) {
    case Isa::kAVX512:
      return fused_kernels_avx512();
    case Isa::kAVX2:
      return fused_kernels_avx2();
    case Isa::kBaseline:
      break;
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace fusedrnn
