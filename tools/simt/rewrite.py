#!/usr/bin/env python3
"""Rewrites CUDA launches `kernel<T...> <<<cfg>>>(args)` into calls of the emulator:
   emu::make_launch("kernel<T...>", EMU_KERNEL_KEY(kernel<T...>),
                    [=](auto... emu_a) { kernel<T...>(emu_a...); }, cfg)(args)
The lambda captures by value: a launch on a stream may be queued or captured into a graph
(runtime.cpp) and run after the launcher has returned. The key finds the kernel's
cudaFuncSetAttribute opt-in. `extern __shared__ [__align__(n)] T name[];` becomes
`T *name = (T *)emu::dynamic_shared();`, the launch's dynamic shared memory.
Usage: rewrite.py in.cu out.cu  (prints the number of launches rewritten to stderr)."""
import re
import sys

src = open(sys.argv[1]).read()
out, pos, n = [], 0, 0
while True:
    i = src.find('<<<', pos)
    if i < 0:
        break
    j = src.find('>>>', i)
    cfg = src[i + 3:j]
    # the kernel expression: identifier, optionally followed by balanced <...>
    k = i
    while k > 0 and src[k - 1].isspace():
        k -= 1
    end = k
    if src[k - 1] == '>':
        depth = 0
        while True:
            k -= 1
            c = src[k]
            if c == '>':
                depth += 1
            elif c == '<':
                depth -= 1
                if depth == 0:
                    break
        while k > 0 and src[k - 1].isspace():
            k -= 1
    while k > 0 and (src[k - 1].isalnum() or src[k - 1] in '_:'):
        k -= 1
    kexpr = src[k:end]
    name = ' '.join(kexpr.split())
    out.append(src[pos:k])
    out.append('emu::make_launch("%s", EMU_KERNEL_KEY(%s), [=](auto... emu_a) { %s(emu_a...); }, %s)' %
               (name, kexpr, kexpr, cfg))
    pos = j + 3
    n += 1
out.append(src[pos:])
src = ''.join(out)

src, nd = re.subn(r'extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;',
                  r'\1 *\2 = (\1 *)emu::dynamic_shared();', src)

# __launch_bounds__(N[, min blocks]): a check at the top of the kernel body that the launch's
# block has at most N threads (a real launch beyond the bound fails).
out, pos, nb = [], 0, 0
while True:
    i = src.find('__launch_bounds__(', pos)
    if i < 0:
        break
    # skip the macro's own definition or mentions in comments
    line_start = src.rfind('\n', 0, i) + 1
    if src[line_start:i].lstrip().startswith(('#', '//')):
        out.append(src[pos:i + 18]); pos = i + 18; continue
    k, depth = i + len('__launch_bounds__('), 1
    while depth:
        depth += {'(': 1, ')': -1}.get(src[k], 0)
        k += 1
    expr = src[i + len('__launch_bounds__('):k - 1]
    # the first argument (max threads), not a later one (min blocks per SM)
    depth, cut = 0, len(expr)
    for j, ch in enumerate(expr):
        depth += {'(': 1, '<': 1, ')': -1, '>': -1}.get(ch, 0)
        if ch == ',' and depth == 0:
            cut = j
            break
    expr = expr[:cut]
    body = src.find('{', k)
    name = src[k:src.find('(', k)].split()[-1]
    out.append(src[pos:body + 1])
    out.append(' emu::check_launch_bounds((%s), "%s");' % (expr, name))
    pos = body + 1
    nb += 1
out.append(src[pos:])
open(sys.argv[2], 'w').write(''.join(out))
sys.stderr.write('%s: %d launch bounds checked\n' % (sys.argv[1], nb))
sys.stderr.write('%s: %d launches rewritten\n' % (sys.argv[1], n))
sys.stderr.write('%s: %d dynamic shared arrays\n' % (sys.argv[1], nd))
