#!/usr/bin/env bash
# launch/mpirun.sh: runs simplest-dist on one machine (a rented multi-GPU box, a workstation) and keeps the run
# alive: one rank per GPU under mpirun, stop signals turned into clean checkpoints, and restarts after crashes.
#
#   launch/mpirun.sh [-n NP] [--restarts N] [--restart-delay S] [--hang-timeout S] [--dry-run] CONFIG.json
#                    [--set key=value ...]
#
# --dry-run prints the command a start would run, and the run directory, and exits.
#
# - Ranks: -n NP, else $NP, else one per visible GPU (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), else 1.
# - mpirun gets --bind-to none (each rank's decoder threads need the node's cores; Open MPI binds ranks to one core
#   each when NP <= 2), --oversubscribe when NP exceeds the CPUs, and --allow-run-as-root as root (rented boxes
#   run as root). $MPIRUN_ARGS adds arguments (a hostfile, MCA settings). Without mpirun, NP 1 runs the binary
#   directly.
# - Stop: SIGTERM, SIGINT, SIGHUP or SIGUSR1 to this script reaches every rank as SIGUSR1 (mpirun answers SIGTERM by
#   killing the ranks after a short grace, before a checkpoint can finish): every rank finishes its step, rank 0
#   writes a checkpoint, the run ends with state "stopped" and this script exits 0. A second signal kills the job.
# - Restarts: a job that ends any other way than done (exit 0), a config or data error (exit 2) or a run that
#   diverged (state "failed") is started again after --restart-delay seconds (default 30), and resumes from its
#   newest checkpoint (docs/checkpoints.md). --restarts (default 3) bounds the restarts in a row that gain no new
#   checkpoint; a run that keeps checkpointing keeps being restarted.
# - Hangs: a job whose status.json (rewritten every run.status_every_s while steps complete) has not changed for
#   --hang-timeout seconds (default 1800; 0 = off) is killed, ranks included, and restarted like a crashed one:
#   the daemon's own timeouts (comm.timeout_s) catch a silent peer, this catches the rest (a GPU or driver hang).
#   Only a file written by the current start counts, and a finished run is left alone.
# Exit: simplest-dist's code from the last start (0 done or stopped, 2 bad input), or 1 when the restarts ran out.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${SIMPLEST_BIN:-$HERE/../simplest-dist}
np=${NP:-}
restarts=3
delay=30
hang=1800
dry=0
say() { echo "launch: $*" >&2; }
die() {
  echo "launch: error: $*" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case $1 in
  -n | --np) np=${2:-}; shift 2 ;;
  --restarts) restarts=${2:-}; shift 2 ;;
  --restart-delay) delay=${2:-}; shift 2 ;;
  --hang-timeout) hang=${2:-}; shift 2 ;;
  --dry-run) dry=1; shift ;;
  -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --) shift; break ;;
  -*) die "unknown option '$1' (see $0 --help)" ;;
  *) break ;;
  esac
done
[ $# -ge 1 ] || die "no config file given (usage: $0 [-n NP] [--restarts N] [--restart-delay S] [--hang-timeout S] CONFIG.json [--set ...])"
whole() { case $1 in '' | *[!0-9]*) return 1 ;; esac; }
[ -z "$np" ] || whole "$np" || die "--np needs a whole number, not '$np'"
whole "$restarts" || die "--restarts needs a whole number, not '$restarts'"
whole "$delay" || die "--restart-delay needs a whole number of seconds, not '$delay'"
whole "$hang" || die "--hang-timeout needs a whole number of seconds, not '$hang'"
[ -x "$BIN" ] || die "$BIN not found or not executable (run make first, or set SIMPLEST_BIN)"

# One rank per GPU this process may use: CUDA counts the entries of CUDA_VISIBLE_DEVICES up to the first invalid one
# ("-1", an empty entry); an empty or "-1" list hides every GPU.
count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local list=${CUDA_VISIBLE_DEVICES//[[:space:]]/} count=0 e
    local IFS=,
    set -f
    for e in $list""; do
      case $e in '' | -*) break ;; esac
      count=$((count + 1))
    done
    set +f
    echo "$count"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU '
  else
    echo 0
  fi
}
if [ -z "$np" ]; then
  np=$(count_gpus)
  [ "$np" -ge 1 ] 2>/dev/null || np=1
fi
[ "$np" -ge 1 ] || die "--np must be at least 1"

# The config must be valid before anything starts, and its run directory is where the state is read.
if ! eff=$("$BIN" check "$@" 2>&1 >/dev/null); then
  echo "$eff" >&2
  exit 2
fi
run_dir=$("$BIN" check "$@" 2>/dev/null | sed -n 's/^[[:space:]]*"dir":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p' | head -n 1)
[ -n "$run_dir" ] || die "could not read run.dir from '$BIN check $*'"

cmd=()
if command -v mpirun >/dev/null 2>&1; then
  # --oversubscribe: Open MPI counts a node's slots as its cores, not its hardware threads; more ranks than cores
  # (CPU runs, or GPUs on a box with few cores) would be refused. With fewer ranks it changes nothing.
  cmd=(mpirun -np "$np" --bind-to none --oversubscribe)
  [ "$(id -u)" = 0 ] && cmd+=(--allow-run-as-root)
  # shellcheck disable=SC2206 # word splitting is the point: MPIRUN_ARGS holds several arguments
  [ -n "${MPIRUN_ARGS:-}" ] && cmd+=(${MPIRUN_ARGS})
elif [ "$np" -gt 1 ]; then
  die "mpirun not found: $np ranks need Open MPI (make deps installs it), or run with -n 1"
fi
cmd+=("$BIN" "$@")
if [ "$dry" = 1 ]; then
  echo "${cmd[*]}"
  echo "run directory: $run_dir"
  exit 0
fi

state() { sed -n 's/.*"state":[[:space:]]*"\([a-z]*\)".*/\1/p' "$run_dir/status.json" 2>/dev/null | head -n 1; }
# the state as this start left it: a status.json older than the start is an earlier run's (this one may have died
# before it wrote its own), and says nothing about this one
fresh_state() {
  local u
  u=$(updated)
  [ -n "$u" ] && [ "$u" -ge "$started" ] && state
}
latest() { cat "$run_dir/checkpoints/latest" 2>/dev/null; }

stopping=0
child=
phase=
# the job runs in its own session (setsid): a terminal's Ctrl-C reaches this script alone, which turns it into the
# SIGUSR1 the ranks checkpoint on (mpirun itself answers SIGINT by killing the job), and a hung job can be killed
# whole, ranks included (they have their own process groups, but not their own sessions)
kill_job() { pkill -KILL -s "$1" 2>/dev/null || kill -KILL -- "-$1" "$1" 2>/dev/null; }
on_stop() {
  stopping=$((stopping + 1))
  [ -n "$child" ] || return
  if [ "$phase" = pause ]; then
    kill -TERM "$child" 2>/dev/null
  elif [ "$stopping" -eq 1 ]; then
    say "stop requested: every rank checkpoints and exits (signal again to kill)"
    kill -USR1 "$child" 2>/dev/null
  else
    say "second stop signal: killing the job"
    kill_job "$child"
  fi
}
trap on_stop TERM INT HUP USR1
updated() { sed -n 's/.*"updated_unix":[[:space:]]*\([0-9]*\).*/\1/p' "$run_dir/status.json" 2>/dev/null | head -n 1; }
setsid=
command -v setsid >/dev/null 2>&1 && setsid=setsid

attempt=0
fruitless=0
while :; do
  attempt=$((attempt + 1))
  before=$(latest)
  if [ "$stopping" -gt 0 ]; then
    say "stopped before start $attempt (newest checkpoint: ${before:-none})"
    exit 0
  fi
  say "start $attempt: ${cmd[*]} (run directory $run_dir)"
  started=$(date +%s)
  $setsid "${cmd[@]}" &
  child=$! phase=job
  [ "$stopping" -gt 0 ] && kill -USR1 "$child" 2>/dev/null  # a signal that came before child was set
  # Poll rather than `wait` alone: the hang watchdog reads status.json, which a live run rewrites at least every
  # run.status_every_s; only a file this start wrote counts (setup before it has no such bound here).
  hung=0
  while kill -0 "$child" 2>/dev/null; do
    sleep 1 &
    wait $! 2>/dev/null
    [ "$hang" -gt 0 ] && [ "$stopping" = 0 ] && [ "$hung" = 0 ] || continue
    u=$(updated)
    now=$(date +%s)
    if [ -n "$u" ] && [ "$u" -ge "$started" ] && [ $((now - u)) -gt "$hang" ] && [ "$(state)" != done ]; then
      say "no status.json update for $((now - u)) s (--hang-timeout $hang): the job is hung, killing it"
      hung=1
      kill_job "$child"
    fi
  done
  # `wait` returns early (status > 128) when a trap runs: wait again while the job lives, and once more when it
  # ended meanwhile (bash keeps its status; 127 means the status above was the job's own)
  while :; do
    wait "$child"
    rc=$?
    if [ "$rc" -gt 128 ]; then
      kill -0 "$child" 2>/dev/null && continue
      wait "$child" 2>/dev/null
      r2=$?
      [ "$r2" != 127 ] && rc=$r2
    fi
    break
  done
  # the ranks may outlive mpirun by a moment (killed, not yet reaped): the next start needs the run directory's lock
  for _ in $(seq 1 300); do pgrep -s "$child" >/dev/null 2>&1 || break; sleep 0.2; done
  child=
  st=$(fresh_state)
  if [ "$stopping" -gt 0 ]; then
    say "stopped: exit $rc, state ${st:-unknown}, newest checkpoint $(latest)"
    [ "$st" = stopped ] || [ "$st" = done ] && exit 0
    exit "$rc"
  fi
  if [ "$hung" = 0 ] && { [ "$rc" = 0 ] || [ "$rc" = 2 ] || [ "$st" = failed ] || [ "$st" = done ]; }; then
    say "finished: exit $rc, state ${st:-unknown}"
    exit "$rc"
  fi
  after=$(latest)
  if [ -n "$after" ] && [ "$after" != "$before" ]; then fruitless=0; else fruitless=$((fruitless + 1)); fi
  if [ "$fruitless" -gt "$restarts" ]; then
    say "giving up: $fruitless starts in a row ended with exit $rc and no new checkpoint (--restarts $restarts)"
    exit 1
  fi
  say "the job ended with exit $rc in state ${st:-unknown} (newest checkpoint: ${after:-none}); restarting in ${delay} s"
  # a restart continues this run, whatever run.resume said for its first start ("never" would move it aside)
  [ "$attempt" = 1 ] && cmd+=(--set run.resume=auto)
  # a stop signal during the pause ends the script here: the job is not running, its last checkpoint stands
  sleep "$delay" &
  child=$! phase=pause
  wait "$child" 2>/dev/null
  child=
  if [ "$stopping" -gt 0 ]; then
    say "stopped before restarting (newest checkpoint: ${after:-none})"
    exit 0
  fi
done
