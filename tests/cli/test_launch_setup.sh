#!/usr/bin/env bash
# The rented-machine scripts without the network: launch/get-data.sh against file:// archives built here (the
# MD5 check refuses an altered archive and keeps nothing unpacked; a good one unpacks into the layout the configs
# read, and a second call finds it there), and launch/vastai/setup.sh end to end on this machine (packages present,
# the build up to date) with a stand-in nvidia-smi that lists two GPUs: it reports them, downloads the dataset,
# and starts the job in the background through launch/mpirun.sh, which runs one rank per GPU (CPU backend here)
# and finishes the run.
set -u
. "$(dirname "$0")/../fixtures.inc"
test_setup launch_setup
mkdir -p "$TMP/src/cifar-10-batches-bin" "$TMP/src/tiny-imagenet-200" "$TMP/bin"
"$PY" - "$TMP/src/cifar-10-batches-bin" <<'PYEOF'
import os, sys
d = sys.argv[1]
for name in ["data_batch_%d.bin" % b for b in range(1, 6)] + ["test_batch.bin"]:
    with open(os.path.join(d, name), "wb") as f:
        for i in range(30):
            f.write(bytes([i % 10]) + bytes(((i * 29 + p * 7) % 256) for p in range(3072)))
PYEOF
tar -czf "$TMP/cifar-10-binary.tar.gz" -C "$TMP/src" cifar-10-batches-bin
echo n01443537 >"$TMP/src/tiny-imagenet-200/wnids.txt"
(cd "$TMP/src" && "$PY" -m zipfile -c "$TMP/tiny-imagenet-200.zip" tiny-imagenet-200)
(cd "$TMP/src" && "$PY" -m zipfile -c "$TMP/wrong.zip" cifar-10-batches-bin)
sum=$(md5sum "$TMP/cifar-10-binary.tar.gz" | cut -d' ' -f1)

# the publisher's MD5 against an archive made here: refused, nothing unpacked
SD_DATA_URL="file://$TMP/cifar-10-binary.tar.gz" bash launch/get-data.sh cifar10 "$TMP/d1" >"$TMP/g1.log" 2>&1
rc=$?
if [ "$rc" = 2 ] && grep -q "cifar-10-binary.tar.gz: MD5 $sum, expected c32a1d4ab5d03f1284b67883e8d87530" "$TMP/g1.log" &&
   [ -f "$TMP/d1/cifar-10-binary.tar.gz.bad" ] && [ ! -e "$TMP/d1/cifar-10-batches-bin" ]; then
  ok "get-data: an archive whose MD5 differs is refused (exit 2, named, kept aside), nothing unpacked"
else
  notok "get-data: MD5 mismatch" "exit $rc" "$(cat "$TMP/g1.log")"
fi
SD_DATA_URL="file://$TMP/cifar-10-binary.tar.gz" SD_DATA_MD5=$sum bash launch/get-data.sh cifar10 "$TMP/d2" >"$TMP/g2.log" 2>&1
rc=$?
again=$(SD_DATA_URL="file:///nonexistent" bash launch/get-data.sh cifar10 "$TMP/d2" 2>&1)
if [ "$rc" = 0 ] && cmp -s "$TMP/src/cifar-10-batches-bin/test_batch.bin" "$TMP/d2/cifar-10-batches-bin/test_batch.bin" &&
   [ ! -e "$TMP/d2/cifar-10-binary.tar.gz" ] && ! ls -a "$TMP/d2" | grep -q unpack && grep -q "already there" <<<"$again" &&
   "$BIN" check configs/reference/tat/cifar10-simplest-adam.json --set data.root="$TMP/d2" >/dev/null 2>&1; then
  ok "get-data: cifar10 unpacked into DIR/cifar-10-batches-bin (the configs' data.root layout); a second call finds it"
else
  notok "get-data: cifar10" "exit $rc" "$(cat "$TMP/g2.log")" "$again"
fi
tsum=$(md5sum "$TMP/tiny-imagenet-200.zip" | cut -d' ' -f1)
SD_DATA_URL="file://$TMP/tiny-imagenet-200.zip" SD_DATA_MD5=$tsum bash launch/get-data.sh tiny-imagenet "$TMP/d3" >"$TMP/g3.log" 2>&1
rc=$?
wsum=$(md5sum "$TMP/wrong.zip" | cut -d' ' -f1)
SD_DATA_URL="file://$TMP/wrong.zip" SD_DATA_MD5=$wsum bash launch/get-data.sh tiny-imagenet "$TMP/d4" >"$TMP/g4.log" 2>&1
rc4=$?
if [ "$rc" = 0 ] && [ -f "$TMP/d3/tiny-imagenet-200/wnids.txt" ] && [ "$rc4" = 2 ] &&
   grep -q "no tiny-imagenet-200/wnids.txt inside" "$TMP/g4.log" && [ ! -e "$TMP/d4/tiny-imagenet-200" ] &&
   [ -z "$(ls -A "$TMP/d4" | grep -v '^tiny-imagenet-200.zip$')" ]; then
  ok "get-data: a zip unpacks (tiny-imagenet-200/); one without the expected folder is refused, leaving nothing unpacked"
else
  notok "get-data: tiny-imagenet" "exit $rc / $rc4" "$(cat "$TMP/g3.log" "$TMP/g4.log")"
fi
bash launch/get-data.sh imagenet >"$TMP/g5.log" 2>&1
rc=$?
if [ "$rc" = 2 ] && grep -q "unknown dataset 'imagenet'" "$TMP/g5.log"; then ok "get-data: an unknown dataset exits 2 naming it"; else
  notok "get-data: unknown dataset" "exit $rc" "$(cat "$TMP/g5.log")"; fi

# setup.sh on this machine: two stand-in GPUs, the dataset from a file:// URL, a short job in the background
if ! command -v mpirun >/dev/null 2>&1 || [ ! -x ./simplest-dist ]; then
  ok "setup.sh end to end # SKIP needs mpirun and a build"; exit 0
fi
printf '#!/bin/sh\necho "GPU 0: Stand-in (UUID: GPU-0)"\necho "GPU 1: Stand-in (UUID: GPU-1)"\n' >"$TMP/bin/nvidia-smi"
chmod +x "$TMP/bin/nvidia-smi"
run="$TMP/runs/cifar"
setup() {
  PATH="$TMP/bin:$PATH" DATASET=cifar10 DATA_DIR="$TMP/d5" SD_DATA_URL="file://$TMP/cifar-10-binary.tar.gz" SD_DATA_MD5=$sum \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    bash launch/vastai/setup.sh configs/reference/tat/cifar10-simplest-adam.json --set data.root="$TMP/d5" \
    --set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=7 \
    --set train.batch_size=20 --set train.steps=100000 --set train.log_every=1 --set train.eval_every=0 \
    --set data.threads=1 --set run.threads=1 --set run.dir="$run"
}
setup >"$TMP/setup.log" 2>&1
rc=$?
pid=$(cat "$run.launch.pid" 2>/dev/null)
for _ in $(seq 1 600); do grep -q '"step":[[:space:]]*[1-9]' "$run/status.json" 2>/dev/null && break; sleep 0.05; done
setup >"$TMP/setup2.log" 2>&1
rc2=$?
kill -TERM "$pid" 2>/dev/null   # the documented way to stop it: a checkpoint, state stopped
for _ in $(seq 1 1500); do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
state=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['state'])" "$run/status.json" 2>/dev/null)
world=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['world_size'])" "$run/status.json" 2>/dev/null)
if [ "$rc" = 0 ] && grep -q "setup: GPUs: 2" "$TMP/setup.log" && grep -Eq "setup: build: USE_NCCL=[01] " "$TMP/setup.log" &&
   grep -q "get-data: .*cifar-10-batches-bin ready" "$TMP/setup.log" && grep -q "training started: launcher pid $pid" "$TMP/setup.log" &&
   [ "$world" = 2 ] && [ "$state" = stopped ] && grep -q "launch: stopped: exit 0, state stopped" "$run.launch.log"; then
  ok "setup.sh: reports 2 GPUs and the build, fetches the dataset, starts the job in the background (2 ranks); kill PID stops it with a checkpoint"
else
  notok "setup.sh end to end" "exit $rc, state $state, world $world" "$(tail -15 "$TMP/setup.log")" "$(grep -v '^step' "$run.launch.log" 2>/dev/null | tail -5)"
fi
if [ "$rc2" = 2 ] && grep -q "a launcher for $run is already running (pid $pid)" "$TMP/setup2.log"; then
  ok "setup.sh again while its job runs: refused, naming the launcher's pid"
else
  notok "setup.sh twice" "exit $rc2" "$(tail -3 "$TMP/setup2.log")"
fi
