#include "isa.h"

#include <c10/util/Exception.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

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

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
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
  } else if (name == "avx512_bf16") {
    out = Isa::kAVX512BF16;
  } else {
    return false;
  }
  return true;
}

std::string supported_list() {
  std::string s = "baseline";
  if (best_isa() >= Isa::kAVX2) s += ", avx2";
  if (best_isa() >= Isa::kAVX512) s += ", avx512";
  if (best_isa() >= Isa::kAVX512BF16) s += ", avx512_bf16";
  return s;
}

Isa checked(const std::string& name, const char* source) {
  Isa isa = Isa::kBaseline;
  TORCH_CHECK_VALUE(parse(name, isa), "fusedrnn: ", source,
                    " must be one of baseline, avx2, avx512, avx512_bf16, got '", name, "'");
  TORCH_CHECK_VALUE(
      isa <= best_isa(), "fusedrnn: ", source, "=", name,
      " asks for an instruction set that this CPU (or this build) does not have; available here: ",
      supported_list());
  return isa;
}

// cpuid leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; and the OS saves the tile state (XCR0
// bits 17, 18).
bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
  __cpuid_count(1, 0, a, b, c, d);
  if (!((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 3u) == 3u;
#else
  return false;
#endif
}

}  // namespace

bool cpu_is_intel() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13];
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  vendor[12] = '\0';
  return std::string(vendor) == "GenuineIntel";
#else
  return false;
#endif
}

namespace {

std::atomic<int> g_isa{-1};
std::atomic<int> g_bf16_tiles{-1};  // -1: not read yet; 0 auto, 1 on, 2 off
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
    case Isa::kAVX512BF16:
      return "avx512_bf16";
  }
  return "?";
}

Isa best_isa() {
  static const Isa best = [] {
    if (fused_kernels_avx512_bf16() != nullptr && cpu_has_avx512_bf16()) return Isa::kAVX512BF16;
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

bool onednn_bf16_amx() {
  static const bool amx = [] {
    if (!cpu_has_amx_bf16()) return false;
    for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
      const char* env = std::getenv(name);
      if (env && *env) {
        std::string v(env);
        for (char& ch : v) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
        return v == "ALL" || v == "DEFAULT" || v.find("AMX") != std::string::npos;
      }
    }
    return true;
  }();
  return amx;
}

namespace {

int parse_bf16_tiles(const std::string& mode, const char* source) {
  if (mode == "auto") return 0;
  if (mode == "on" || mode == "1") return 1;
  if (mode == "off" || mode == "0") return 2;
  TORCH_CHECK_VALUE(false, "fusedrnn: ", source, " must be one of auto, on, off, got '", mode, "'");
  return 0;
}

const char* bf16_tiles_name(int mode) { return mode == 1 ? "on" : mode == 2 ? "off" : "auto"; }

int bf16_tiles_mode() {
  int v = g_bf16_tiles.load(std::memory_order_acquire);
  if (v >= 0) return v;
  const char* env = std::getenv("FUSEDRNN_CPU_BF16_TILES");
  v = env && *env ? parse_bf16_tiles(env, "FUSEDRNN_CPU_BF16_TILES") : 0;
  g_bf16_tiles.store(v, std::memory_order_release);
  return v;
}

}  // namespace

bool bf16_tiles() {
  const int mode = bf16_tiles_mode();
  return mode == 1 || (mode == 0 && !onednn_bf16_amx());
}

std::string set_bf16_tiles(const std::string& mode) {
  const int v = parse_bf16_tiles(mode, "the bf16 tiles mode");
  const std::string previous = bf16_tiles_name(bf16_tiles_mode());
  g_bf16_tiles.store(v, std::memory_order_release);
  return previous;
}

const FusedStepKernels* fused_kernels() {
  switch (current_isa()) {
    case Isa::kAVX512BF16:
      return fused_kernels_avx512_bf16();
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
