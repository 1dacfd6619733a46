// Closes a per-ISA translation unit (see isa_begin.h).
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
