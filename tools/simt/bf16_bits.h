// tools/simt: bf16 <-> fp32 on bits, shared by the emulated cuda_bf16.h (cuda_emu.h) and the
// cuBLASLt stand-in (cublaslt_emu.cpp, which is built against the real CUDA headers and so
// cannot include cuda_emu.h). Exact round-to-nearest-even; NaN -> canonical 0x7fff, as
// cvt.rn.bf16.f32 does on sm_80+.
#pragma once
#include <stdint.h>
#include <string.h>

namespace emu {
inline unsigned short f2bf_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float bf2f(unsigned short h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
}  // namespace emu
