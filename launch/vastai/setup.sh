#!/usr/bin/env bash
# launch/vastai/setup.sh: a freshly rented GPU machine (vast.ai, RunPod, Lambda and the like: a Debian or Ubuntu
# image with the CUDA toolkit, e.g. nvidia/cuda:13.0.0-devel-ubuntu24.04, usually as root) to a running job. Run
# it from the repository root:
#
#   launch/vastai/setup.sh                           # packages, build, GPU and NCCL report; says what to run next
#   DATASET=cifar10 launch/vastai/setup.sh           # ... and downloads CIFAR-10 into data/ (launch/get-data.sh)
#   launch/vastai/setup.sh CONFIG.json [--set ...]   # ... and starts training in the background: launch/mpirun.sh
#                                                    # (a rank per GPU, restarts after crashes) under nohup, so that
#                                                    # it survives the end of the ssh session
#
# Steps: (1) the Debian packages (`make deps`; build tools first when the image has none); (2) the CUDA toolkit:
# nvcc on the PATH, else $CUDA_HOME, else /usr/local/cuda; without one the build is CPU-only, and it says so;
# (3) NCCL for several GPUs: the Makefile's search (`make build-info`), else NVIDIA's libnccl-dev when apt has it;
# (4) `make`; (5) the GPUs, and `simplest-dist version`; (6) the dataset; (7) the job.
# The job's output goes to <run.dir>.launch.log; `kill <pid>` (the launcher's; SIGTERM, since nohup leaves it
# deaf to SIGINT and SIGHUP) stops it with a checkpoint, and running the same command again resumes it (a second
# launcher for a run directory whose launcher still runs is refused).
set -u
cd "$(dirname "$0")/../.." || exit 2
say() { echo "setup: $*"; }
die() {
  echo "setup: error: $*" >&2
  exit 2
}
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo" || say "not root and no sudo: packages cannot be installed"
fi
apt_install() {
  [ -n "$SUDO" ] || [ "$(id -u)" = 0 ] || return 1
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
updated=0
apt_update() {
  [ "$updated" = 1 ] && return 0
  updated=1
  [ -n "$SUDO" ] || [ "$(id -u)" = 0 ] || return 1
  $SUDO apt-get update -qq
}

# (1) build tools and the Debian packages
if ! command -v make >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1 || ! command -v pkg-config >/dev/null 2>&1; then
  say "installing build tools"
  { apt_update && apt_install build-essential pkg-config; } || die "build-essential and pkg-config are needed"
fi
if ! make --no-print-directory deps; then
  [ -n "$SUDO" ] || die "make deps could not install the packages above"
  say "installing the packages with sudo"
  apt_update
  # shellcheck disable=SC2046 # the package list is words
  apt_install $(make --no-print-directory -s --eval 'print-debs: ; @echo $(DEB_PKGS)' print-debs) ||
    die "the packages could not be installed"
fi

# (2) the CUDA toolkit
if ! command -v nvcc >/dev/null 2>&1; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then
      export PATH="$d/bin:$PATH"
      break
    fi
  done
fi
if command -v nvcc >/dev/null 2>&1; then
  say "CUDA toolkit: $(nvcc --version | tail -n 1) at $(dirname "$(dirname "$(command -v nvcc)")")"
else
  say "no CUDA toolkit (nvcc): the build has only the CPU backend; pick an image with the toolkit (a *-devel tag)"
fi
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU '); fi
say "GPUs: $gpus"

# (3) NCCL, which several GPU ranks need
if command -v nvcc >/dev/null 2>&1 && [ "$gpus" -gt 1 ] &&
   make --no-print-directory build-info | grep -q '^USE_NCCL=0'; then
  say "no NCCL found; trying NVIDIA's libnccl-dev"
  # the build for this toolkit's CUDA major (NVIDIA's repository carries builds for several: 2.x-1+cuda13.0, ...)
  major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  apt_update
  ver=$(apt-cache madison libnccl-dev 2>/dev/null | awk '{print $3}' | grep "+cuda${major}\." | head -n 1)
  { [ -n "$ver" ] && apt_install "libnccl2=$ver" "libnccl-dev=$ver"; } ||
    say "no libnccl-dev for CUDA $major in this image's apt sources: pip install nvidia-nccl-cu$major (in a venv where pip refuses the system Python), or set NCCL_HOME, then run this again"
fi

# (4) the build
make --no-print-directory -j"$(nproc)" || die "the build failed"
make --no-print-directory build-info | sed 's/^/setup: build: /'
./simplest-dist version | sed 's/^/setup: /'
if [ "$gpus" -gt 1 ] && make --no-print-directory build-info | grep -q '^USE_NCCL=0'; then
  say "warning: $gpus GPUs but no NCCL in this build: only one GPU rank can train (launch/mpirun.sh -n 1)"
fi

# (5) the dataset (DATA_DIR, default data/, is what the reference configs' data.root says; elsewhere, pass
# --set data.root=DATA_DIR too). The nvidia/cuda images remove curl once their apt sources are set up.
if [ -n "${DATASET:-}" ]; then
  need=""
  command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 || need="$need curl ca-certificates"
  case $DATASET in tiny*) command -v unzip >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1 || need="$need unzip" ;; esac
  if [ -n "$need" ]; then
    say "installing$need for the download"
    # shellcheck disable=SC2086 # the package list is words
    { apt_update && apt_install $need; } || die "$need could not be installed"
  fi
  launch/get-data.sh "$DATASET" "${DATA_DIR:-data}" || exit $?
fi

# (6) the job
if [ $# -eq 0 ]; then
  say "ready. Train with: launch/mpirun.sh CONFIG.json [--set ...]   (e.g. configs/reference/tat/cifar10-simplest-shampoo.json)"
  exit 0
fi
./simplest-dist check "$@" >/dev/null || exit 2
run_dir=$(./simplest-dist check "$@" 2>/dev/null | sed -n 's/^[[:space:]]*"dir":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p' | head -n 1)
[ -n "$run_dir" ] || die "could not read run.dir from the config"
# a launcher of this run still alive (the pid file may be stale: after a container restart its number can belong to
# anything, so the process must be a launcher of this run directory)
old_pid=$(cat "$run_dir.launch.pid" 2>/dev/null)
if [ -n "$old_pid" ] && tr '\0' ' ' <"/proc/$old_pid/cmdline" 2>/dev/null | grep -q "launch/mpirun.sh .*$run_dir"; then
  die "a launcher for $run_dir is already running (pid $old_pid); stop it first: kill $old_pid"
fi
log="$run_dir.launch.log"
mkdir -p "$(dirname "$log")"
nohup setsid launch/mpirun.sh "$@" >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$run_dir.launch.pid"
say "training started: launcher pid $pid (also in $run_dir.launch.pid), output in $log"
say "progress: $run_dir/status.json; stop with a checkpoint: kill $pid; resume: the same command again"
