// tools/simt: the emulated runtime's entry points for code built without shim.h (the cuBLASLt
// stand-in, compiled against the real cublasLt.h): only standard types cross this line.
#pragma once
#include <stddef.h>

#include <functional>
#include <string>

namespace simt {
// Puts op on the stream (a cudaStream_t) as a kernel launch would go: run at once on the legacy
// stream, queued on a created one, recorded while it captures. 0 or the cudaError_t value.
int enqueue_op(void *stream, const char *what, std::function<void()> op);
// [p, p + bytes) lies inside one device allocation.
bool device_span(const void *p, size_t bytes);
// An emulator error: printed, and failing the next synchronisation.
void report(const std::string &msg);
// The emulated device's memory (EMU_DEVICE_GIB).
size_t device_memory_bytes();
}  // namespace simt
