#!/usr/bin/env bash
# launch/get-data.sh: downloads a dataset of the reference's experiments (configs/reference/) into the layout the
# configs expect, checks the archive's MD5 against the publisher's, and unpacks it.
#
#   launch/get-data.sh cifar10|cifar100|tiny-imagenet [DIR]     (DIR defaults to data/, the configs' data.root)
#
#   cifar10        DIR/cifar-10-batches-bin/   (www.cs.toronto.edu, binary version, 162 MB)
#   cifar100       DIR/cifar-100-binary/       (www.cs.toronto.edu, binary version, 161 MB)
#   tiny-imagenet  DIR/tiny-imagenet-200/      (cs231n.stanford.edu, 237 MB; the zip's layout, read as it is)
#
# Fashion-MNIST comes from the Debian package dataset-fashion-mnist (make deps); ImageNet needs an account at
# image-net.org (shared/seed/README.md has the steps; `simplest-dist prepare` makes a resized copy).
# A mirror: SD_DATA_URL=URL (file:// works) and, when the mirror repacked the archive, SD_DATA_MD5=SUM.
# Exit 0 when the data is in place (also when it already was), 2 on a bad argument or a bad download.
set -u
die() {
  echo "get-data: error: $*" >&2
  exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 cifar10|cifar100|tiny-imagenet [DIR]"
name=$1
dir=${2:-data}
case $name in
cifar10) file=cifar-10-binary.tar.gz md5=c32a1d4ab5d03f1284b67883e8d87530 url=https://www.cs.toronto.edu/~kriz/$file
  out=cifar-10-batches-bin probe=test_batch.bin ;;
cifar100) file=cifar-100-binary.tar.gz md5=03b5dce01913d631647c71ecec9e9cb8 url=https://www.cs.toronto.edu/~kriz/$file
  out=cifar-100-binary probe=test.bin ;;
tiny-imagenet | tiny) file=tiny-imagenet-200.zip md5=90528d7ca1a48142e341f4ef8d21d0de url=http://cs231n.stanford.edu/$file
  out=tiny-imagenet-200 probe=wnids.txt ;;
*) die "unknown dataset '$name' (cifar10, cifar100 or tiny-imagenet; Fashion-MNIST is the Debian package dataset-fashion-mnist)" ;;
esac
url=${SD_DATA_URL:-$url}
md5=${SD_DATA_MD5:-$md5}
if [ -e "$dir/$out/$probe" ]; then
  echo "get-data: $dir/$out is already there"
  exit 0
fi
mkdir -p "$dir" || die "cannot create $dir"
archive="$dir/$file"  # named for the dataset, not the URL: a mirror's URL may end in anything
part="$archive.part"
tmp="$dir/.unpack-$out.$$"
trap 'rm -rf "$tmp" "$part"' EXIT
if [ ! -f "$archive" ]; then
  echo "get-data: downloading $url"
  if command -v curl >/dev/null 2>&1; then
    curl -fL --retry 3 -o "$part" "$url" || die "download of $url failed"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$part" "$url" || die "download of $url failed"
  else
    die "neither curl nor wget is installed"
  fi
  mv "$part" "$archive" || die "cannot rename $part to $archive"
fi
got=$(md5sum "$archive" | cut -d' ' -f1)
if [ "$got" != "$md5" ]; then
  mv "$archive" "$archive.bad"
  die "$archive: MD5 $got, expected $md5 (kept as $archive.bad; a partial or altered download)"
fi
# unpacked beside the final name, then renamed: an interrupted unpack never looks complete
rm -rf "$tmp"
mkdir -p "$tmp"
case $archive in
*.tar.gz) tar -xzf "$archive" -C "$tmp" || die "$archive: tar could not unpack it" ;;
*.zip)
  if command -v unzip >/dev/null 2>&1; then unzip -q "$archive" -d "$tmp" || die "$archive: unzip could not unpack it"
  elif command -v python3 >/dev/null 2>&1; then python3 -m zipfile -e "$archive" "$tmp" || die "$archive: could not unpack it"
  else die "$archive: unzip or python3 is needed to unpack it"; fi ;;
esac
[ -e "$tmp/$out/$probe" ] || die "$archive: no $out/$probe inside"
rm -rf "${dir:?}/$out"
mv "$tmp/$out" "$dir/$out" || die "cannot move the unpacked $out into $dir (the archive is kept: $archive)"
rm -f "$archive"
echo "get-data: $dir/$out ready"
