#!/usr/bin/env bash
# `simplest-dist status RUN_DIR [--stale S]`: the summary of a live and of a finished run, and its verdict for
# health checks: exit 0 for a healthy or finished run; 1 for a failed run, a live run whose status.json stopped
# changing, or a rank whose heartbeat stopped (status files edited from a real run's); 2 for a missing or foreign
# file and bad arguments.
set -u
. "$(dirname "$0")/../fixtures.inc"
test_setup status_cmd
fmnist_data
BASE="$DATA --set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=7
  --set model.patch_size=7 --set train.batch_size=64 --set train.log_every=1 --set data.train_limit=1024
  --set data.eval_limit=256 --set run.threads=1 --set opt.name=shampoo --set shampoo.precondition_frequency=5
  --set shampoo.start_preconditioning_step=5 --set run.status_every_s=1"

# a live run: training, healthy, an ETA
"$BIN" configs/fashion-mnist.json $BASE --set train.steps=100000 --set run.dir="$TMP/live" >"$TMP/live.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do grep -q '"step":[[:space:]]*[1-9]' "$TMP/live/status.json" 2>/dev/null && break; sleep 0.05; done
out=$("$BIN" status "$TMP/live"); rc=$?
kill -TERM $pid; wait $pid
if [ "$rc" = 0 ] && grep -q "^$TMP/live: training, step [0-9]* of 100000" <<<"$out" && grep -q "ETA " <<<"$out" &&
   grep -Eq "shampoo: [1-9][0-9]* blocks, [0-9]+ refreshes" <<<"$out" && grep -q "health: ok" <<<"$out"; then
  ok "status of a live run: training, step of T, ETA, Shampoo, healthy (exit 0)"
else
  notok "status of a live run (exit $rc)" "$out"
fi
out=$("$BIN" status "$TMP/live"); rc=$?
if [ "$rc" = 0 ] && grep -q ": stopped, step" <<<"$out" && grep -q "checkpoint: $TMP/live/checkpoints/step_" <<<"$out"; then
  ok "status of a stopped run: its checkpoint, exit 0"
else
  notok "status of a stopped run (exit $rc)" "$out"
fi

# a finished run, then its status.json edited into the cases a health check must catch
"$BIN" configs/fashion-mnist.json $BASE --set train.steps=6 --set train.eval_every=3 --set run.dir="$TMP/done" >"$TMP/done.log" 2>&1
out=$("$BIN" status "$TMP/done"); rc=$?
if [ "$rc" = 0 ] && grep -q ": done, step 6 of 6 (100.0 %" <<<"$out" && grep -q "eval at step 6: top-1 0\.[0-9]*" <<<"$out"; then
  ok "status of a finished run: done, the eval, exit 0"
else
  notok "status of a finished run (exit $rc)" "$out"
fi
edit() {  # name python-statements-on-s: a copy of the finished run's status.json, edited
  mkdir -p "$TMP/$1"
  "$PY" - "$TMP/done/status.json" "$TMP/$1/status.json" "$2" <<'PYEOF'
import json, sys, time
s = json.load(open(sys.argv[1])); now = time.time()
exec(sys.argv[3])
json.dump(s, open(sys.argv[2], "w"))
PYEOF
}
verdict() {  # name want-exit want-text [--stale S]
  local name=$1 want=$2 text=$3; shift 3
  out=$("$BIN" status "$TMP/$name" "$@" 2>&1); rc=$?
  if [ "$rc" = "$want" ] && grep -qF -- "$text" <<<"$out"; then ok "status: $name (exit $want)"; else
    notok "status: $name: exit $rc, want $want and '$text'" "$out"; fi
}
edit fresh 's["state"] = "training"; s["updated_unix"] = now - 5'
verdict fresh 0 "health: ok"
edit stale 's["state"] = "training"; s["updated_unix"] = now - 4000'
verdict stale 1 "no update for 1 h 6 min while training (over 600 s"
verdict stale 0 "health: ok" --stale 5000
edit stale_eval 's["state"] = "evaluating"; s["updated_unix"] = now - 100'
verdict stale_eval 1 "no update for 1 min while evaluating (over 60 s" --stale 60
edit failed 's["state"] = "failed"'
verdict failed 1 "the run failed"
edit silent_rank 's["state"] = "training"; s["updated_unix"] = now; s["world_size"] = 2; r = dict(s["ranks"][0]); r["rank"] = 1; r["heartbeat_unix"] = now - 900; s["ranks"].append(r)'
verdict silent_rank 1 "rank 1 has not reported for 900 s"
edit old_done 's["updated_unix"] = now - 86400 * 3'
verdict old_done 0 "health: ok"
mkdir -p "$TMP/foreign"; echo '{"state": "training"}' >"$TMP/foreign/status.json"
verdict foreign 2 "not a simplest-dist status file"
verdict nowhere 2 "$TMP/nowhere/status.json: cannot read it"
verdict done 2 "--stale needs a positive number of seconds, not 'soon'" --stale soon
