#!/usr/bin/env bash
# The Makefile's NCCL search (`make build-info`), in each place a GPU machine may keep NCCL: the CUDA toolkit's,
# NCCL_HOME, and pip's nvidia-nccl-cu13 (site-packages/nvidia/nccl with libnccl.so.2 and no libnccl.so link) beside
# a toolkit that has none. The pip case is also linked for real: the binary must load libnccl.so.2 from pip's folder
# (its rpath) and run. Layouts are built from this machine's toolkit with symlinks; skipped without nvcc.
set -u
TMP=${TEST_TMP:-$(mktemp -d)}/build_nccl
rm -rf "$TMP"; mkdir -p "$TMP"
ok() { echo "ok - $1"; }
notok() { echo "not ok - $1"; shift; for l in "$@"; do echo "    $l"; done; }
# a plain `make` builds the binary (a rule placed above `all:` would become the default and build nothing)
if make -pq 2>/dev/null | grep -qx '.DEFAULT_GOAL := all'; then ok "make's default goal is all"; else
  notok "make's default goal" "$(make -pq 2>/dev/null | grep '^.DEFAULT_GOAL')"; fi
NVCC=$(if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME/bin/nvcc"; else command -v nvcc; fi)
CUDA=${NVCC%/bin/nvcc}
if [ -z "$NVCC" ] || [ ! -e "$CUDA/include/nccl.h" ] || ! ls "$CUDA"/lib64/libnccl.so.2 >/dev/null 2>&1; then
  ok "NCCL search # SKIP no nvcc with the toolkit's NCCL on this machine"; exit 0
fi
unset NCCL_HOME
info() { make --no-print-directory build-info "$@" 2>&1; }

out=$(CUDA_HOME=$CUDA info)
if grep -q "USE_NCCL=1 NCCL_INC=$CUDA/include NCCL_LIB=-lnccl" <<<"$out"; then ok "the toolkit's NCCL"; else
  notok "the toolkit's NCCL" "$out"; fi
out=$(CUDA_HOME=$CUDA info USE_NCCL=0)
if grep -q "USE_NCCL=0 " <<<"$out"; then ok "USE_NCCL=0 builds without it"; else notok "USE_NCCL=0" "$out"; fi

# a toolkit without NCCL (every file but NCCL's, linked), and NCCL elsewhere
mkdir -p "$TMP/cuda/bin" "$TMP/cuda/include" "$TMP/cuda/lib64"
ln -s "$NVCC" "$TMP/cuda/bin/nvcc"
for f in "$CUDA"/include/*; do [ "${f##*/}" = nccl.h ] || ln -s "$f" "$TMP/cuda/include/"; done
for f in "$CUDA"/lib64/*; do case ${f##*/} in libnccl*) ;; *) ln -s "$f" "$TMP/cuda/lib64/" ;; esac; done
mkdir -p "$TMP/pip/nvidia/nccl/include" "$TMP/pip/nvidia/nccl/lib" "$TMP/home/include" "$TMP/home/lib"
cp "$CUDA/include/nccl.h" "$TMP/pip/nvidia/nccl/include/"
cp -L "$CUDA/lib64/libnccl.so.2" "$TMP/pip/nvidia/nccl/lib/"
cp "$CUDA/include/nccl.h" "$TMP/home/include/"
ln -s "$CUDA/lib64/libnccl.so.2" "$TMP/home/lib/libnccl.so"

# the system's include directory is a make variable (NCCL_SYSTEM_INC, /usr/include): empty here, then with nccl.h
mkdir -p "$TMP/sysinc-empty" "$TMP/sysinc"
cp "$CUDA/include/nccl.h" "$TMP/sysinc/"
out=$(CUDA_HOME=$TMP/cuda PYTHONPATH=/nonexistent info NCCL_SYSTEM_INC=$TMP/sysinc-empty)
if grep -q "USE_NCCL=0 NCCL_INC= " <<<"$out"; then ok "a toolkit without NCCL and no other: built without it"; else
  notok "no NCCL anywhere" "$out"; fi
out=$(CUDA_HOME=$TMP/cuda PYTHONPATH=$TMP/pip info NCCL_SYSTEM_INC=$TMP/sysinc)
if grep -q "USE_NCCL=1 NCCL_INC=$TMP/sysinc NCCL_LIB=-lnccl" <<<"$out"; then
  ok "the system's nccl.h (libnccl-dev, as in the nvidia/cuda devel images) before pip's"
else
  notok "the system's NCCL" "$out"
fi
out=$(CUDA_HOME=$TMP/cuda PYTHONPATH=$TMP/pip info NCCL_SYSTEM_INC=$TMP/sysinc-empty)
if grep -q "USE_NCCL=1 NCCL_INC=$TMP/pip/nvidia/nccl/include NCCL_LIB=$TMP/pip/nvidia/nccl/lib/libnccl.so.2" <<<"$out"; then
  ok "pip's nvidia-nccl found through python3 (libnccl.so.2 by file name)"
else
  notok "pip's NCCL" "$out"
fi
out=$(info USE_CUDA=0)
if grep -q "USE_CUDA=0" <<<"$out" && grep -q "^USE_NCCL=0 " <<<"$out"; then ok "a build without CUDA reports USE_NCCL=0"; else
  notok "build-info without CUDA" "$out"; fi
out=$(CUDA_HOME=$TMP/cuda info NCCL_HOME=$TMP/home)
if grep -q "USE_NCCL=1 NCCL_INC=$TMP/home/include NCCL_LIB=$TMP/home/lib/libnccl.so" <<<"$out"; then ok "NCCL_HOME"; else
  notok "NCCL_HOME" "$out"; fi
out=$(CUDA_HOME=$TMP/cuda info NCCL_HOME=$TMP/nowhere)
if grep -q "NCCL_HOME=$TMP/nowhere has no include/nccl.h" <<<"$out"; then ok "a wrong NCCL_HOME stops the build naming it"; else
  notok "wrong NCCL_HOME" "$out"; fi

# the pip case linked: the objects of this tree's build with the pip case's link line
if [ -f build/src/main.o ] && [ -f build/libsimplest.a ]; then
  link=$(CUDA_HOME=$TMP/cuda PYTHONPATH=$TMP/pip make --no-print-directory --eval 'link-line: ; @echo $(CC) $(LDFLAGS) $(LDLIBS)' link-line NCCL_SYSTEM_INC=$TMP/sysinc-empty)
  read -r cc rest <<<"$link"
  # shellcheck disable=SC2086 # the link line is words
  if $cc -o "$TMP/sd-pip" build/src/main.o build/libsimplest.a $rest 2>"$TMP/link.err" &&
     ldd "$TMP/sd-pip" | grep -q "libnccl.so.2 => $TMP/pip/nvidia/nccl/lib/libnccl.so.2" &&
     "$TMP/sd-pip" version | grep -q simplest-dist; then
    ok "linked against pip's NCCL: libnccl.so.2 loads from its folder and the binary runs"
  else
    notok "link against pip's NCCL" "$(cat "$TMP/link.err")" "$(ldd "$TMP/sd-pip" 2>&1 | grep -i nccl)"
  fi
fi
