#!/usr/bin/env python3
"""attention.cu's argument checks and entry point (sf_cuda_attention_bf16 with its split-decode
dispatch), with the launch of the tiled mma.sync kernel, which the emulator cannot run, replaced:
  unsupported  returns SF_ERR_UNSUPPORTED (the decode suite: only the split decode may run)
  reference    calls simt_attention_reference (attention_ref.cu; the engine suite)
The cut must find its markers, so a change to attention.cu fails here instead of silently
testing something else.
Usage: attention_entry.py attention.cu out.cu unsupported|reference"""
import sys

src, out, mode = sys.argv[1:4]
s = open(src).read()
start = 'extern "C" sf_status sf_attention_check_shapes('
launch = '    sf_nvtx_range range("sf_cuda_attention_bf16");'
for marker in (start, launch):
    if s.count(marker) != 1:
        sys.exit('attention_entry.py: expected one %r in %s' % (marker, src))
body = s[s.index(start):]
i = body.index(launch)
j = body.index('\n}', i)
if mode == 'unsupported':
    tail = '    return sf_fail(SF_ERR_UNSUPPORTED, "simt: no tiled attention kernel");'
elif mode == 'reference':
    tail = '    return simt_attention_reference(a, stream);'
else:
    sys.exit('attention_entry.py: mode must be unsupported or reference')
body = body[:i] + tail + body[j:]
open(out, 'w').write(
    '#include <math.h>\n#include <stdint.h>\n#include "attention.h"\n#include "cuda_check.cuh"\n'
    'namespace { bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; } }\n'
    'sf_status simt_attention_reference(const sf_attention_args *a, cudaStream_t stream);\n' +
    body)
