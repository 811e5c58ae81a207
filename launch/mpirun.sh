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
#   --hang-timeout seconds (default: 1800, or run.checkpoint_timeout_s + 300 when that is longer; 0 = off) is
#   killed, ranks included, and restarted like a crashed one: the daemon's own timeouts (comm.timeout_s) catch a
#   silent peer, this catches the rest (a GPU or driver hang). Only a file written by the current start counts. A
#   job that wrote its final state (done, stopped, failed) but has not exited 300 s later is stuck in its teardown:
#   it is killed and the launcher ends as that state says.
# Exit: 0 done or stopped, 1 failed or restarts used up, 2 bad input, 75 the run directory is another job's.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${SIMPLEST_BIN:-$HERE/../simplest-dist}
np=${NP:-}
restarts=3
delay=30
hang=1800
hang_given=0
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
  --hang-timeout) hang=${2:-} hang_given=1; shift 2 ;;
  --dry-run) dry=1; shift ;;
  -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --) shift; break ;;
  -*) die "unknown option '$1' (see $0 --help)" ;;
  *) break ;;
  esac
done
[ $# -ge 1 ] || die "no config file given (usage: $0 [-n NP] [--restarts N] [--restart-delay S] [--hang-timeout S] CONFIG.json [--set ...])"
# a stop before the first start (the config checks take a moment) ends the launcher with nothing started
stopping=0
child=
phase=
trap 'stopping=$((stopping + 1))' TERM INT HUP USR1
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
effective=$("$BIN" check "$@" 2>/dev/null)
# JSON string escapes undone for the two characters a path may hold that JSON escapes (" and \)
run_dir=$(printf '%s\n' "$effective" | sed -n 's/^[[:space:]]*"dir":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p' | head -n 1 |
  sed 's/\\"/"/g; s/\\\\/\\/g')
[ -n "$run_dir" ] || die "could not read run.dir from '$BIN check $*'"
# the watchdog must outlast a checkpoint (status.json is not rewritten while one is written, for up to
# run.checkpoint_timeout_s)
if [ "$hang_given" = 0 ]; then
  ckt=$(printf '%s\n' "$effective" | sed -n 's/^[[:space:]]*"checkpoint_timeout_s":[[:space:]]*\([0-9]*\).*/\1/p' | head -n 1)
  [ -n "$ckt" ] && [ $((ckt + 300)) -gt "$hang" ] && hang=$((ckt + 300))
fi

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
updated() { sed -n 's/.*"updated_unix":[[:space:]]*\([0-9]*\).*/\1/p' "$run_dir/status.json" 2>/dev/null | head -n 1; }
# the state as this start left it: a status.json older than the start is an earlier run's (this one may have died
# before it wrote its own), and says nothing about this one
fresh_state() {
  local u
  u=$(updated)
  [ -n "$u" ] && [ "$u" -ge "$started" ] && state
}
latest() { cat "$run_dir/checkpoints/latest" 2>/dev/null; }
# this start took the run directory over (its config.json is written once the directory is the run's, a fresh one
# moved aside or a checkpoint resumed)
claimed() {
  local m
  m=$(stat -c %Y "$run_dir/config.json" 2>/dev/null)
  [ -n "$m" ] && [ "$m" -ge "$started" ]
}

# The job runs in its own session (setsid): a terminal's Ctrl-C reaches this script alone, which turns it into the
# SIGUSR1 the ranks checkpoint on (mpirun itself answers SIGINT by killing the job), and a job can be killed whole,
# ranks included (they have their own process groups, but not their own sessions).
kill_job() { pkill -KILL -s "$1" 2>/dev/null || kill -KILL -- "-$1" "$1" 2>/dev/null; }
on_stop() {
  stopping=$((stopping + 1))
  [ -n "$child" ] || return
  if [ "$phase" = pause ]; then
    kill -TERM "$child" 2>/dev/null
  elif [ "$phase" = job ] && [ "$stopping" -eq 1 ]; then
    say "stop requested: every rank checkpoints and exits (signal again to kill)"
    forward_stop
  elif [ "$phase" = job ]; then
    say "second stop signal: killing the job"
    kill_job "$child"
  fi
}
# SIGUSR1 for the ranks: once the job is up (this start wrote status.json, or 3 s passed; before that mpirun may not
# have started the ranks and drops the signal, or a rank not yet in main dies of it), and again every 5 s until the
# job ends (a dropped one costs a delay, not the stop)
forward_stop() {
  local u
  u=$(updated)
  [ $((SECONDS - start_s)) -ge 3 ] || { [ -n "$u" ] && [ "$u" -ge "$started" ]; } || return
  kill -USR1 "$child" 2>/dev/null
  last_usr1=$SECONDS
}
trap on_stop TERM INT HUP USR1
setsid=
if command -v setsid >/dev/null 2>&1; then setsid=setsid; else
  say "warning: no setsid (util-linux): Ctrl-C also reaches mpirun, which kills the ranks before they checkpoint; stop with kill PID"
fi
command -v pgrep >/dev/null 2>&1 || say "warning: no pgrep/pkill (procps): a hung job's ranks may outlive its kill"

attempt=0
fruitless=0
resume_auto=0
while :; do
  attempt=$((attempt + 1))
  before=$(latest)
  if [ "$stopping" -gt 0 ]; then
    say "stopped before start $attempt (newest checkpoint: ${before:-none})"
    exit 0
  fi
  say "start $attempt: ${cmd[*]} (run directory $run_dir)"
  started=$(date +%s) start_s=$SECONDS last_usr1=-100
  $setsid "${cmd[@]}" &
  child=$! phase=job
  # Poll rather than `wait` alone: the hang watchdog reads status.json, which a live run rewrites at least every
  # run.status_every_s; only a file this start wrote counts (setup before it has no such bound here). A run that
  # wrote its last state (done, stopped, failed) and does not exit is stuck in its teardown: killed sooner.
  hung=0
  while kill -0 "$child" 2>/dev/null; do
    sleep 1 &
    wait $! 2>/dev/null
    # a stop asked for (also before child was set, or in the first 3 s): forwarded, and again until the job ends
    [ "$stopping" = 1 ] && [ $((SECONDS - last_usr1)) -ge 5 ] && forward_stop
    [ "$hang" -gt 0 ] && [ "$stopping" = 0 ] && [ "$hung" = 0 ] || continue
    u=$(updated)
    [ -n "$u" ] && [ "$u" -ge "$started" ] || continue
    now=$(date +%s)
    limit=$hang
    case $(state) in done | stopped | failed) [ "$limit" -gt 300 ] && limit=300 ;; esac
    if [ $((now - u)) -gt "$limit" ]; then
      say "no status.json update for $((now - u)) s (state $(state), limit $limit s): the job is hung, killing it"
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
  phase=ended
  # what is left of an abnormal end (ranks outliving mpirun) is killed; the next start needs the run directory's
  # lock, so it waits until they are gone
  [ "$rc" != 0 ] && kill_job "$child"
  for _ in $(seq 1 300); do pgrep -s "$child" >/dev/null 2>&1 || break; sleep 0.2; done
  child=
  st=$(fresh_state)
  if [ "$stopping" -gt 0 ]; then
    say "stopped: exit $rc, state ${st:-unknown}, newest checkpoint $(latest)"
    { [ "$st" = stopped ] || [ "$st" = done ]; } && exit 0
    exit "$rc"
  fi
  case $st in
  done | stopped)  # the run's files are complete; a crash in its teardown does not change that
    say "finished: exit $rc, state $st"
    [ "$rc" != 0 ] && say "(the job ended with exit $rc after writing its final state: the run is complete)"
    exit 0 ;;
  failed)
    say "finished: exit $rc, state failed (the run's output says why; its newest checkpoint: $(latest))"
    exit 1 ;;
  esac
  if [ "$rc" = 0 ] || [ "$rc" = 2 ]; then
    say "finished: exit $rc, state ${st:-unknown}"
    exit "$rc"
  fi
  if [ "$rc" = 75 ] && [ "$attempt" = 1 ]; then
    say "the run directory is in use by another job (exit 75): not starting a second one"
    exit 75
  fi
  after=$(latest)
  if [ -n "$after" ] && [ "$after" != "$before" ]; then fruitless=0; else fruitless=$((fruitless + 1)); fi
  if [ "$fruitless" -gt "$restarts" ]; then
    say "giving up: $fruitless starts in a row ended with exit $rc and no new checkpoint (--restarts $restarts)"
    exit 1
  fi
  say "the job ended with exit $rc in state ${st:-unknown} (newest checkpoint: ${after:-none}); restarting in ${delay} s"
  # a restart continues the run this launcher's first start made, whatever run.resume said for that start ("never"
  # would move it aside); a start that died before it took the directory over leaves the user's setting
  if [ "$resume_auto" = 0 ] && claimed; then
    cmd+=(--set run.resume=auto)
    resume_auto=1
  fi
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
