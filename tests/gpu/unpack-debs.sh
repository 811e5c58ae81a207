#!/usr/bin/env bash
# unpack-debs.sh DEB_DIR PREFIX: unpacks every .deb of DEB_DIR (from `make vendor-debs`) into PREFIX with dpkg -x
# (or ar + tar where there is no dpkg), NEVER into /, repoints absolute symlinks into PREFIX (zlib1g-dev's libz.so
# points at /lib/...), and prints the make variables that build against them:
#   EXTRA_CFLAGS=...  (-I for cJSON, OpenBLAS's cblas.h, LAPACKE, zlib)
#   EXTRA_LDFLAGS=... (-L and -Wl,-rpath for each lib folder, with --disable-new-dtags: an RPATH, unlike a RUNPATH,
#                      also serves the libraries' own dependencies, e.g. liblapacke -> liblapack.so.3 -> openblas)
#   LIBDIRS=...       (the same folders, colon-separated, for LD_LIBRARY_PATH if wanted)
set -euo pipefail
debs=${1:?usage: unpack-debs.sh DEB_DIR PREFIX}
prefix=${2:?usage: unpack-debs.sh DEB_DIR PREFIX}
case "$prefix" in /|"") echo "unpack-debs: refusing to unpack into '$prefix'" >&2; exit 2 ;; esac
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd -P)
[ "$prefix" = / ] && { echo "unpack-debs: refusing to unpack into /" >&2; exit 2; }
debs=$(cd "$debs" && pwd)
shopt -s nullglob
files=("$debs"/*.deb)
[ ${#files[@]} -gt 0 ] || { echo "unpack-debs: no .deb in $debs" >&2; exit 1; }
for f in "${files[@]}"; do
    if command -v dpkg >/dev/null 2>&1; then
        dpkg -x "$f" "$prefix"
    else  # a .deb is an ar archive holding data.tar.{xz,zst,gz}
        tmp=$(mktemp -d)
        (cd "$tmp" && ar x "$f")
        tar -xf "$tmp"/data.tar.* -C "$prefix"
        rm -rf "$tmp"
    fi
done
# Absolute symlinks point into the host's /: repoint them into the prefix.
while IFS= read -r -d '' l; do
    t=$(readlink "$l")
    case "$t" in /*) [ -e "$prefix$t" ] && ln -sfn "$prefix$t" "$l" ;; esac
done < <(find "$prefix" -type l -print0)
ma=x86_64-linux-gnu
inc="-I$prefix/usr/include -I$prefix/usr/include/cjson -I$prefix/usr/include/$ma/openblas-pthread -I$prefix/usr/include/$ma"
dirs="$prefix/usr/lib/$ma/openblas-pthread $prefix/usr/lib/$ma $prefix/lib/$ma"
ld="-Wl,--disable-new-dtags"
libdirs=""
for d in $dirs; do
    [ -d "$d" ] || continue
    ld="$ld -L$d -Wl,-rpath,$d"
    libdirs="${libdirs:+$libdirs:}$d"
done
echo "EXTRA_CFLAGS=$inc"
echo "EXTRA_LDFLAGS=$ld"
echo "LIBDIRS=$libdirs"
