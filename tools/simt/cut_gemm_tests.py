#!/usr/bin/env python3
"""The emulator's copy of tests/test_cuda_backward.cpp without CUDA's headers: its cuBLASLt
GEMM section (up to the next section's banner) and GEMM argument test cut out (host/cuda/gemm.c
and the cuBLASLt stand-in are built against the real cuda_runtime.h and cublasLt.h; with them
run.sh keeps the section). Every cut must find its markers, so a change to the test file fails
loudly here instead of silently running less.
Usage: cut_gemm_tests.py in.cpp out.cpp"""
import sys

src_path, out_path = sys.argv[1], sys.argv[2]
s = open(src_path).read()


def need(s, text):
    if s.count(text) != 1:
        sys.exit('cut_gemm_tests.py: expected one %r in %s' % (text, src_path))


need(s, '#include "cuda/gemm.h"\n')
s = s.replace('#include "cuda/gemm.h"\n', '')
banner = '// ' + '=' * 93 + '\n'
need(s, '// GEMM backward (cuBLASLt)')
# the section: from its opening banner to the next section's (the banner after its title's)
title = s.index('// GEMM backward (cuBLASLt)')
gi = s.rindex(banner, 0, title)
ai = s.index(banner, s.index(banner, title) + len(banner))
s = s[:gi] + s[ai:]
need(s, 'TEST(CudaBackwardArgs, GemmBackwardRejectsBadArgumentsBeforeTheCache)')
ti = s.index('TEST(CudaBackwardArgs, GemmBackwardRejectsBadArgumentsBeforeTheCache)')
te = s.rindex('}  // namespace')
s = s[:ti] + s[te:]
open(out_path, 'w').write(s)
