// Internal: where the Hopper attention kernel (attention_sm90.cu) puts its wgmma operands in
// shared memory, and the descriptors that tell wgmma so. Plain C++ (no PTX), so that the
// emulator's twin of ptx_sm90.cuh uses these very functions.
#pragma once

#include <stdint.h>

namespace sf_attn {

// Operand tiles in shared memory, no swizzle: "core matrices" of 8 rows x 16 bytes (8 bf16),
// each 128 contiguous bytes, row r of a core matrix at byte 16 r. A tile of `rows` rows and
// `chunks` 16-byte columns stores chunk column c of row group r / 8 at core matrix
// c * rows / 8 + r / 8. This one placement serves every operand here:
//   A (Q, 64 x 16 per instruction, K-major: rows are M, chunks are K): leading byte offset
//     (between core matrices adjacent in K) = rows * 16, stride byte offset (adjacent in M) = 128;
//   B (K, keys x head dim, K-major: rows are N, chunks K): LBO = rows * 16, SBO = 128;
//   B (V, keys x head dim, MN-major: rows are K, chunks N; wgmma's transpose-b): LBO (adjacent
//     in K) = 128, SBO (adjacent in N) = rows * 16.
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk, int rows) {
    return (uint32_t)((chunk * (rows / 8) + row / 8) * 128 + (row % 8) * 16);
}

// The 64-bit wgmma descriptor of a no-swizzle operand at shared address addr: bits 0-13 addr,
// 16-29 the leading, 32-45 the stride byte offset (all >> 4), base offset 0, swizzle mode 0.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFFu) >> 4) | (uint64_t)((lbo & 0x3FFFFu) >> 4) << 16 |
           (uint64_t)((sbo & 0x3FFFFu) >> 4) << 32;
}

}  // namespace sf_attn
