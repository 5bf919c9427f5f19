#!/usr/bin/env python3
"""Rewrites CUDA launches `kernel<T...> <<<cfg>>>(args)` into calls of the emulator:
   emu::make_launch("kernel<T...>", EMU_KERNEL_KEY(kernel<T...>),
                    [=](auto... emu_a) { kernel<T...>(emu_a...); }, cfg)(args)
The lambda captures by value: a launch on a stream may be queued or captured into a graph
(runtime.cpp) and run after the launcher has returned. The key finds the kernel's
cudaFuncSetAttribute opt-in. `extern __shared__ [__align__(n)] T name[];` becomes
`T *name = (T *)emu::dynamic_shared();`, the launch's dynamic shared memory, and a static
`__shared__ T name[n];` a reference into the launch's static shared window.
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

# `__shared__ T a[n], b;` (static shared memory) becomes, per declarator,
# `static char emu_key_a; auto &a = emu::static_shared<T[n]>(&emu_key_a);`: the bytes come from
# the launch's static shared window (shim.h), poisoned before every block. A plain static would
# not do: the static locals of a template kernel are COMDAT data, which ignores the section
# attribute that places the others, so they would keep the last block's values unpoisoned.
def split_top(text, sep=','):
    parts, depth, cur = [], 0, ''
    for ch in text:
        depth += {'(': 1, '[': 1, '<': 1, '{': 1, ')': -1, ']': -1, '>': -1, '}': -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    return parts


def static_shared(m):
    decl = m.group(1)
    parts = split_top(decl)
    first = re.match(r'(.*?)\b(\w+)\s*((?:\[[^\]]*\]\s*)*)$', parts[0].strip(), re.S)
    if not first:
        raise SystemExit('rewrite.py: cannot read the __shared__ declaration: ' + decl)
    ctype = first.group(1).strip()
    decls = [(first.group(2), first.group(3).strip())]
    for extra in parts[1:]:
        d = re.match(r'\s*(\w+)\s*((?:\[[^\]]*\]\s*)*)$', extra)
        if not d:
            raise SystemExit('rewrite.py: cannot read the __shared__ declarator: ' + extra)
        decls.append((d.group(1), d.group(2).strip()))
    # each bound in parentheses: a `>` in one would end the template argument list
    return ' '.join('static char emu_key_%s; auto &%s = emu::static_shared<%s%s>(&emu_key_%s);' %
                    (name, name, ctype, re.sub(r'\[([^\]]*)\]', r'[(\1)]', dims), name)
                    for name, dims in decls)


src, ns = re.subn(r"(?<![\w#])(?<!extern )__shared__\s+([^;{}]+);", static_shared, src)

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
sys.stderr.write('%s: %d static shared declarations\n' % (sys.argv[1], ns))
