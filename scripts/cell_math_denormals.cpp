// The LSTM cell math of csrc/cells (exp, sigmoid, tanh and the state update) in a loop compiled
// for AVX2 as the step kernels are (-O3 -fno-math-errno -fno-trapping-math), timed with the
// previous cell state 0 and 3: a loop that computes a denormal in some lane takes a microcode
// assist per vector whenever the state is not 0 (docs/performance.md, "fp64 cells"). Prints
// ns per element for float and double, and whether the MXCSR denormal flags were raised.
//
//   g++ -O3 -fno-math-errno -fno-trapping-math -std=c++17 -Icsrc scripts/cell_math_denormals.cpp \
//       -o /tmp/cell_math_denormals && /tmp/cell_math_denormals
#include <xmmintrin.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "cells/common.h"
#include "cells/lstm.h"

template <typename T>
__attribute__((target("avx2,fma"), noinline)) void step(const T* a, const T* c_prev, T* c_out,
                                                        T* h_out, int n) {
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    T i, f, g, o, c, h;
    fusedrnn::LSTMCell<T>::forward(a[j], a[n + j], a[2 * n + j], a[3 * n + j], c_prev[j], i, f, g,
                                   o, c, h);
    c_out[j] = c;
    h_out[j] = h;
  }
}

template <typename T>
void run(const char* name) {
  const int n = 4096, repeats = 2000;
  std::mt19937 rng(0);
  std::uniform_real_distribution<double> u(-0.14, 0.14);  // pre-activations of an initial model
  std::vector<T> a(4 * n), c_out(n), h_out(n);
  for (T& v : a) v = static_cast<T>(u(rng));
  for (double c : {0.0, 3.0}) {
    std::vector<T> c_prev(n, static_cast<T>(c));
    _mm_setcsr(_mm_getcsr() & ~0x12u);  // clear the denormal-operand and underflow flags
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r)
      step<T>(a.data(), c_prev.data(), c_out.data(), h_out.data(), n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s, c_prev = %g: %.2f ns per element, denormal flags %s\n", name, c,
                s / repeats / n * 1e9, (_mm_getcsr() & 0x12u) ? "raised" : "clear");
  }
}

int main() {
  run<float>("float");
  run<double>("double");
}
