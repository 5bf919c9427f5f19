#!/usr/bin/env bash
# Run HERE (the developer machine) before using a lent GPU: the GPU machine reaches no package
# registry, so copy what the build needs that its image may lack into .deps/ (git-ignored),
# then name .deps in the device run's `carry`:
#   .deps/googletest   GoogleTest sources (tests/CMakeLists.txt builds them when no package)
#   .deps/prefix       jansson's and PCRE2's headers and static libraries (found through
#                      CMAKE_PREFIX_PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests >/dev/null
rm -rf .deps && mkdir -p .deps/prefix/include .deps/prefix/lib
cp -r /usr/src/googletest .deps/googletest
cp /usr/include/jansson.h /usr/include/jansson_config.h .deps/prefix/include/
cp /usr/include/pcre2.h .deps/prefix/include/
arch=$(gcc -print-multiarch)
cp /usr/lib/"$arch"/libjansson.a /usr/lib/"$arch"/libpcre2-8.a .deps/prefix/lib/
du -sh .deps
