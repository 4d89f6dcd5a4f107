#!/usr/bin/env bash
# Durable disclosures per second with 1, 2 and 3 gateway replicas over one PostgreSQL
# on this machine, against the sled default and the bare mutual-TLS echo, in one run;
# and, while each PostgreSQL run is under load, where its ceiling is. Method and
# figures: benches/README.md, "Replicas over PostgreSQL".
#
#   benches/replicas.sh            # about 5 minutes once the release build is done
#
# Environment: ROUNDS (default 2), DURATION (default 10s), CONCURRENCY (default 64),
# POOL_SIZE (default 32, per replica), CARGO_TARGET_DIR (default target), KEEP=1 to
# keep the scratch folder (logs, JSON, samples) for reading afterwards, and
# SUBJECT_ROWS:
#   as-is (default): the gateway as it is. Before dae78a1 a disclosure's row lock
#     inserted the child's `subject_locks` row inside the transaction it then rolled
#     back, so the row never persisted and every disclosure about one child waited
#     for the one before it; fixed there.
#   precreate: before the measured bench, a one-second bench at one caller through
#     the first replica records the children's consents, and the script commits
#     their `subject_locks` rows (from `consents`), as a fixed gateway would have
#     them; the measured bench then seeds as usual. Says what replicas can do once
#     that is fixed; labelled in the output.
#
# 1. A throwaway PostgreSQL cluster, as in .ci/run: initdb as the postgres user
#    (initdb refuses root) into a temp folder, trust auth, 127.0.0.1 only, a free
#    port, max_connections=300, track_wal_io_timing=on (for pg_stat_wal's sync time).
# 2. cargo build --release, once.
# 3. Per round, interleaved: the sled default (`sgw bench` starts its own gateway),
#    then R = 1, 2, 3 replicas, each over a fresh database: `sgw serve --config ...
#    --listen 127.0.0.1:0`, one config file and data_dir (keys only) for all, driven
#    by one `sgw bench --addr ... --baseline --json`.
# 4. During the gateway's measured window of each PostgreSQL run (sgw bench
#    --mark-window says when), it measures: CPU of the postgres processes, of the
#    replicas, of the bench client and of the whole machine (/proc, utime+stime);
#    transactions (pg_stat_database.xact_commit, and xids assigned); WAL fsyncs
#    (pg_stat_wal.wal_sync, wal_sync_time); and, every 100 ms from one psql session
#    (\watch), what each of the database's client backends is doing: running, waiting
#    on a lock (and which: the log head `audit_head`, a child's `subject_locks` row),
#    on WAL I/O, an LWLock, or idle in a transaction (waiting for its gateway).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
POOL_SIZE=${POOL_SIZE:-32}
SUBJECT_ROWS=${SUBJECT_ROWS:-as-is}
case "$SUBJECT_ROWS" in as-is | precreate) ;; *) echo "SUBJECT_ROWS: as-is or precreate" >&2; exit 2 ;; esac
TARGET=${CARGO_TARGET_DIR:-target}

WORK=$(mktemp -d /tmp/sgw-replicas.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${PG_DIR:-}" ]; then
    "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { echo "== $*" >&2; }

# --- 1. PostgreSQL 15 (any installed major; 15 here), as in .ci/run
pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  return 1
}
if ! PG_BIN=$(pg_bindir); then
  log "installing PostgreSQL (Debian package postgresql)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  PG_BIN=$(pg_bindir)
fi
PG_DIR=$(mktemp -d /tmp/sgw-replicas-pg.XXXXXX)
for _ in $(seq 1 50); do
  PG_PORT=$((20000 + RANDOM % 40000))
  (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null || break
done
PG_RUN=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$PG_DIR" --shell /bin/sh postgres
  chown postgres "$PG_DIR"
  PG_RUN=(runuser -u postgres --)
fi
log "starting a throwaway PostgreSQL ($PG_BIN) on 127.0.0.1:$PG_PORT"
"${PG_RUN[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U sgw -E UTF8 --no-locale >"$PG_DIR/initdb.log" 2>&1 \
  || { cat "$PG_DIR/initdb.log"; exit 1; }
"${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 start \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=300 -c track_wal_io_timing=on -c shared_preload_libraries=pg_stat_statements" >/dev/null \
  || { cat "$PG_DIR/server.log"; exit 1; }
PG_MAIN=$(head -1 "$PG_DIR/data/postmaster.pid")
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U sgw "$@"; }
log "$(psql_ -d postgres -tAc 'SELECT version()')"
log "fsync=$(psql_ -d postgres -tAc 'SHOW fsync'), synchronous_commit=$(psql_ -d postgres -tAc 'SHOW synchronous_commit'), wal_sync_method=$(psql_ -d postgres -tAc 'SHOW wal_sync_method'), shared_buffers=$(psql_ -d postgres -tAc 'SHOW shared_buffers')"

# --- 2. one release build
log "cargo build --release"
cargo build --release --quiet
B=$(realpath "$TARGET/release/sgw")
log "binary $B, code $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' + uncommitted changes in src/')"

# The replicas' shared folder: `sgw serve --dev` once writes sgw.dev.toml, certs/dev
# and the keys in data/dev; each PostgreSQL run appends its [storage] to a copy.
GW="$WORK/gw"
mkdir -p "$GW"
(cd "$GW" && exec env RUST_LOG=warn "$B" serve --dev --listen 127.0.0.1:0 >/dev/null 2>"$GW/dev.log") &
DEV_PID=$!
for _ in $(seq 1 300); do grep -q "listening on" "$GW/dev.log" 2>/dev/null && break; sleep 0.1; done
kill "$DEV_PID"; wait "$DEV_PID" 2>/dev/null || true
grep -q "listening on" "$GW/dev.log" || { cat "$GW/dev.log"; exit 1; }

# CPU ticks (utime+stime, USER_HZ) of the given pids, summed.
ticks_of() {
  local p sum=0 f
  local -a v
  for p in "$@"; do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    read -r -a v <<<"${f##*) }"   # v[0] is field 3 (state) of proc(5)
    sum=$((sum + v[11] + v[12]))
  done
  echo "$sum"
}
# CPU ticks of the postmaster and its children (exited children are in the
# postmaster's cutime+cstime once reaped).
pg_ticks() {
  # A process may exit between the glob and the read: cat then fails, and must not
  # end the script (pipefail).
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v main="$PG_MAIN" '{
      pid = $1
      sub(/^.*\) /, "")             # drop pid and (comm): $1 is now field 3, the state
      if ($2 == main) s += $12 + $13
      else if (pid == main) s += $12 + $13 + $14 + $15
    } END { print s + 0 }'
}
# Busy and total ticks of the whole machine, from /proc/stat.
machine_ticks() {
  awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}
# Counters of one database: xact_commit, xids assigned, WAL records, bytes, writes,
# syncs, sync ms. (Backends report them at most once a second: over a 10 s window
# that is a few per cent.)
pg_counters() {
  psql_ -d "$1" -tA -F ' ' -c "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
      pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
      wal_records, wal_bytes, wal_write, wal_sync, wal_sync_time FROM pg_stat_wal"
}
# The replicas' audit group commits, summed: commits, entries, seconds in the commit
# transaction (from taking a connection to COMMIT returning), from their /metrics;
# then each replica's entries, comma-separated.
audit_metrics() {
  local a
  for a in "${METRICS[@]}"; do curl -s --max-time 2 "http://$a/metrics" || true; echo "# end"; done | awk '
    $1 == "sgw_audit_commits_total" { c += $2 } $1 == "sgw_audit_entries_total" { e += $2; one = $2 }
    $1 == "sgw_audit_sync_seconds_total" { t += $2 } $0 == "# end" { each = each sep (one + 0); sep = ","; one = 0 }
    END { printf "%d %d %.6f %s\n", c, e, t, each }'
}

# Runs `sgw bench` with "$@", waits for its gateway window, takes the "before"
# counters, waits for the window's end, takes the "after" ones. Writes
# $OUT.json, $OUT.err and $OUT.window (key=value lines). With a database ($DB), also
# the counters and CPU of postgres and of the replicas ($REPLICA_PIDS).
bench_run() {
  local out=$1; shift
  "$B" bench "$@" --mark-window --json >"$out.json" 2>"$out.err" &
  local bench_pid=$!
  local i
  for i in $(seq 1 1200); do
    grep -q "gateway window start" "$out.err" 2>/dev/null && break
    kill -0 "$bench_pid" 2>/dev/null || break
    sleep 0.05
  done
  local t0 m0 c0 g0 p0 k0 a0
  t0=$(date +%s.%N); m0=$(machine_ticks); c0=$(ticks_of "$bench_pid")
  g0=$(ticks_of "${REPLICA_PIDS[@]}"); p0=$(pg_ticks)
  k0=""; a0=""
  if [ -n "${DB:-}" ]; then
    k0=$(pg_counters "$DB"); a0=$(audit_metrics)
    psql_ -d "$DB" -tAc "SELECT pg_stat_statements_reset()" >/dev/null
  fi
  for i in $(seq 1 1200); do
    grep -q "gateway window end" "$out.err" 2>/dev/null && break
    kill -0 "$bench_pid" 2>/dev/null || break
    sleep 0.05
  done
  local t1 m1 c1 g1 p1 k1 a1
  t1=$(date +%s.%N); m1=$(machine_ticks); c1=$(ticks_of "$bench_pid")
  g1=$(ticks_of "${REPLICA_PIDS[@]}"); p1=$(pg_ticks)
  k1=""; a1=""
  if [ -n "${DB:-}" ]; then
    k1=$(pg_counters "$DB"); a1=$(audit_metrics)
    # The statements the database spent the window on, most time first.
    psql_ -d "$DB" -tA -F $'\t' >"$out.statements" -c "SELECT calls, round(total_exec_time::numeric, 1), rows,
        regexp_replace(left(query, 90), '\s+', ' ', 'g')
      FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      ORDER BY total_exec_time DESC LIMIT 8"
  fi
  local rc=0
  wait "$bench_pid" || rc=$?
  {
    echo "t0=$t0"; echo "t1=$t1"; echo "rc=$rc"
    echo "machine0='$m0'"; echo "machine1='$m1'"
    echo "client0=$c0"; echo "client1=$c1"
    echo "gw0=$g0"; echo "gw1=$g1"; echo "pg0=$p0"; echo "pg1=$p1"
    echo "k0='$k0'"; echo "k1='$k1'"; echo "a0='$a0'"; echo "a1='$a1'"
  } >"$out.window"
  if [ "$rc" != 0 ]; then
    log "sgw bench exited $rc; its stderr:"; sed 's/^/    /' "$out.err" >&2
  fi
}

BENCH_ARGS=(--op get-record --concurrency "$CONCURRENCY" --baseline --duration "$DURATION")
RESULTS="$WORK/results.tsv"   # setup round file
: >"$RESULTS"

run_sled() {
  local round=$1 out="$WORK/sled.r$round"
  log "round $round: sled default"
  REPLICA_PIDS=(); METRICS=(); DB=""
  bench_run "$out" "${BENCH_ARGS[@]}"
  printf 'sled (1 gateway)\t%s\t%s\n' "$round" "$out" >>"$RESULTS"
}

run_pg() {
  local r=$1 round=$2 out="$WORK/pg$1.r$2"
  DB="sgw_r${r}_${round}"
  log "round $round: $r replica(s) over PostgreSQL, database $DB"
  psql_ -d postgres -c "CREATE DATABASE $DB"
  psql_ -d "$DB" -c "CREATE EXTENSION pg_stat_statements"
  local conf="$GW/sgw.$DB.toml"
  cp "$GW/sgw.dev.toml" "$conf"
  printf '\n[metrics]\nlisten = "127.0.0.1:0"\n' >>"$conf"
  printf '\n[storage]\nbackend = "postgres"\nurl = "postgres://sgw@127.0.0.1:%s/%s"\npool_size = %s\n' \
    "$PG_PORT" "$DB" "$POOL_SIZE" >>"$conf"
  REPLICA_PIDS=(); METRICS=()
  local addrs=() i
  for i in $(seq 1 "$r"); do
    (cd "$GW" && exec env RUST_LOG=warn "$B" serve --config "$conf" --listen 127.0.0.1:0 \
      >/dev/null 2>"$out.replica$i.err") &
    REPLICA_PIDS+=($!); PIDS+=($!)
    # The first replica migrates the fresh database; the others start after it.
    local a="" m=""
    for _ in $(seq 1 600); do
      a=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out.replica$i.err" | head -1)
      [ -n "$a" ] && break
      kill -0 "${REPLICA_PIDS[-1]}" 2>/dev/null || break
      sleep 0.1
    done
    [ -n "$a" ] || { log "replica $i did not start:"; cat "$out.replica$i.err" >&2; exit 1; }
    addrs+=(--addr "$a")
    for _ in $(seq 1 50); do
      m=$(sed -n 's|.*metrics on http://\([^/]*\)/.*|\1|p' "$out.replica$i.err" | head -1)
      [ -n "$m" ] && break
      sleep 0.1
    done
    METRICS+=("$m")
  done
  # One psql session samples the backends every 100 ms for the whole bench.
  if [ "$SUBJECT_ROWS" = precreate ]; then
    "$B" bench "${addrs[@]:0:2}" --pki-dir "$GW/certs/dev" --op get-record --records 2 \
      --concurrency 1 --connections 1 --warmup 0s --duration 1s --json >"$out.pre.json" 2>"$out.pre.err" \
      || { log "the pre-run failed:"; cat "$out.pre.err" >&2; }
    psql_ -d "$DB" -c "INSERT INTO subject_locks (subject_ref) SELECT DISTINCT subject_ref FROM consents ON CONFLICT DO NOTHING"
  fi
  psql_ -d "$DB" -tA -F ' ' >"$out.waits" 2>/dev/null <<SQL &
SELECT extract(epoch FROM clock_timestamp())::numeric(20,3),
       CASE WHEN a.state = 'idle in transaction' THEN 'idle-in-tx'
            WHEN a.wait_event_type IS NULL THEN 'running'
            ELSE a.wait_event_type || '/' || a.wait_event END,
       CASE WHEN a.query LIKE '%audit_head%FOR UPDATE%' THEN 'log-head'
            WHEN a.query LIKE '%subject_locks%' THEN 'subject-lock'
            WHEN a.query LIKE '%audit_%' THEN 'audit-other'
            WHEN a.query ILIKE 'COMMIT%' THEN 'commit'
            ELSE 'other' END,
       count(*)
  FROM pg_stat_activity a
 WHERE a.datname = current_database() AND a.backend_type = 'client backend'
   AND a.pid <> pg_backend_pid() AND a.state <> 'idle'
 GROUP BY 1, 2, 3 \watch 0.1
SQL
  local sampler=$!
  PIDS+=($sampler)
  bench_run "$out" "${addrs[@]}" --pki-dir "$GW/certs/dev" "${BENCH_ARGS[@]}"
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  psql_ -d "$DB" -tAc "SELECT count(*) FROM subject_locks" >"$out.subject_rows"
  local p
  for p in "${REPLICA_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${REPLICA_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  local label="$r replica(s), postgres"
  [ "$SUBJECT_ROWS" = precreate ] && label="$label, rows precreated"
  printf '%s\t%s\t%s\n' "$label" "$round" "$out" >>"$RESULTS"
  DB=""
}

START=$(date +%s)
log "load: $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min) before the runs"
for round in $(seq 1 "$ROUNDS"); do
  run_sled "$round"
  for r in 1 2 3; do run_pg "$r" "$round"; done
done
log "load: $(cut -d' ' -f1-3 /proc/loadavg) after; runs took $(($(date +%s) - START)) s"

# --- summary: one row per run
echo
echo "## GetRecord, $CONCURRENCY callers, --baseline --duration $DURATION (one row per run)"
echo
echo "| setup | round | GetRecord/s | echo req/s | ratio to echo | p50 ms | p99 ms | echo p99 ms | p99 ratio | errors | echo errors |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
while IFS=$'\t' read -r setup round out; do
  jq -r --arg s "$setup" --arg r "$round" '
    def f(x; n): if x == null then "-" else (x * pow(10; n) | round / pow(10; n) | tostring) end;
    def e(x): (if (x.errors // {}) == {} then "0" else (x.errors | tostring) end)
      + (if (x.warmup_errors // {}) == {} then "" else " (in the warm-up: \(x.warmup_errors | tostring))" end);
    "| \($s) | \($r) | \(f(.gateway.requests_per_second; 0)) | \(f(.baseline.requests_per_second; 0)) | \(f(.ratio.throughput; 2))x | \(f(.gateway.p50_ms; 2)) | \(f(.gateway.p99_ms; 2)) | \(f(.baseline.p99_ms; 2)) | \(f(.ratio.p99; 2))x | \(e(.gateway)) | \(e(.baseline)) |"
  ' "$out.json" 2>/dev/null || echo "| $setup | $round | (no JSON: see $out.err) |"
done <"$RESULTS"

# --- where the ceiling is: one row per PostgreSQL run, over the gateway's window
hz=$(getconf CLK_TCK)
CPU_T="$WORK/t.cpu"; DB_T="$WORK/t.db"; WAIT_T="$WORK/t.wait"
: >"$CPU_T"; : >"$DB_T"; : >"$WAIT_T"
while IFS=$'\t' read -r setup round out; do
  case "$setup" in sled*) continue ;; esac
  # shellcheck disable=SC1090
  . "$out.window"
  rate=$(jq -r '.gateway.requests_per_second // 0' "$out.json" 2>/dev/null || echo 0)
  awk -v setup="$setup" -v round="$round" -v t0="$t0" -v t1="$t1" -v hz="$hz" -v rate="$rate" \
      -v m0="$machine0" -v m1="$machine1" -v c0="$client0" -v c1="$client1" \
      -v g0="$gw0" -v g1="$gw1" -v p0="$pg0" -v p1="$pg1" -v k0="$k0" -v k1="$k1" \
      -v a0="$a0" -v a1="$a1" -v r="${setup%% *}" \
      -v cpu_t="$CPU_T" -v db_t="$DB_T" -v wait_t="$WAIT_T" '
    function cores(a, b) { return (b - a) / hz / el }
    BEGIN {
      el = t1 - t0
      split(m0, M0, " "); split(m1, M1, " "); split(k0, K0, " "); split(k1, K1, " ")
      split(a0, A0, " "); split(a1, A1, " ")
    }
    $1 >= t0 && $1 < t1 && NF >= 4 {
      if (!($1 in seen)) { seen[$1] = 1; samples++ }
      state = $2; what = $3; n = $4
      if (state == "running") run += n
      else if (state == "idle-in-tx") { if (what == "subject-lock") idle_subj += n; else if (what == "log-head" || what == "audit-other") idle_audit += n; else idle_other += n }
      else if (state ~ /^Lock\//) { if (what == "log-head") head += n; else if (what == "subject-lock") subj += n; else lockother += n }
      else if (state ~ /^LWLock\//) lw += n
      else if (state ~ /^IO\/WAL/) io += n
      else other += n
    }
    END {
      s = samples > 0 ? samples : 1
      calls = rate * el; calls = calls > 0 ? calls : 1
      machine = (M1[1] - M0[1]) / hz / el; ncpu = (M1[2] - M0[2]) / hz / el
      pg = cores(p0, p1); gw = cores(g0, g1); cl = cores(c0, c1)
      printf "| %s | %s | %.0f | %.2f of %.2f | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f | %.0f |\n",
        setup, round, rate, machine, ncpu, pg, gw, cl, machine - pg - gw - cl,
        pg * el * 1e6 / calls, gw * el * 1e6 / calls, cl * el * 1e6 / calls >> cpu_t
      syncs = K1[6] - K0[6]; syncms = K1[7] - K0[7]
      ac = A1[1] - A0[1]; ae = A1[2] - A0[2]; at = A1[3] - A0[3]
      n = split(A0[4], E0, ","); split(A1[4], E1, ","); each = ""
      for (i = 1; i <= n; i++) each = each (i > 1 ? " / " : "") sprintf("%.0f", (E1[i] - E0[i]) / el)
      printf "| %s | %s | %.0f | %.0f | %.1f | %.1f | %.2f | %.0f | %.2f | %.0f%% | %.0f | %.1f | %.2f | %.0f%% | %s |\n",
        setup, round, (K1[1] - K0[1]) / el, (K1[2] - K0[2]) / el,
        (K1[3] - K0[3]) / calls, (K1[4] - K0[4]) / calls / 1024,
        (syncs > 0 ? syncms / syncs : 0), syncs / el, (syncs > 0 ? (ae > 0 ? ae : 0) / syncs : 0), syncms / 10 / el,
        ac / el, (ac > 0 ? ae / ac : 0), (ac > 0 ? at * 1000 / ac : 0), at * 100 / el / (r > 0 ? r : 1), each >> db_t
      printf "| %s | %s | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.0f |\n",
        setup, round, idle_subj / s, idle_audit / s, idle_other / s, run / s, head / s, subj / s,
        lockother / s, lw / s, io / s, other / s, samples >> wait_t
    }' "$out.waits"
done <"$RESULTS"

echo
echo "## Where the ceiling is: CPU during the gateway's measured window (PostgreSQL runs)"
echo
echo "Cores busy (2 = the whole machine), from /proc utime+stime; \"others\" is everything else"
echo "on the machine (other sessions' builds and tests). µs/call: CPU per successful GetRecord."
echo
echo "| setup | round | GetRecord/s | machine busy | postgres | replicas | bench client | others | postgres µs/call | replicas µs/call | client µs/call |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
cat "$CPU_T"
echo
echo "## The database's work and the audit log head in the same window"
echo
echo "xact commits/s and xids/s from pg_stat_database and the next xid; WAL from pg_stat_wal"
echo "(track_wal_io_timing=on); audit commits from the replicas' /metrics, summed; \"commit ms\""
echo "is one group commit transaction from taking a connection to COMMIT returning, and"
echo "\"writer busy\" its share of the window (each replica has one audit writer)."
echo
echo "| setup | round | xact commits/s | xids/s | WAL records per call | WAL KiB per call | ms per WAL fsync | WAL fsyncs/s | audit entries per WAL fsync | WAL fsync busy | audit commits/s | entries per audit commit | audit commit ms | audit writer busy | audit entries/s by replica |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
cat "$DB_T"
echo
echo "## What the database's client backends were doing (mean backends per 100 ms sample)"
echo
echo "Idle in a transaction: a disclosure's row lock on its child (subject_locks) held"
echo "while its gateway works, or an audit group commit between statements. Lock: waiting"
echo "for a row lock, on the log head (audit_head FOR UPDATE) or on a child's row."
echo
echo "| setup | round | idle in tx: child's lock held | idle in tx: audit commit | idle in tx: other | running | Lock: log head | Lock: child's row | Lock: other | LWLock | IO (WAL) | other waits | samples |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
cat "$WAIT_T"

echo
echo "Top statements by time in the window (pg_stat_statements: calls, total ms, rows, query):"
while IFS=$'\t' read -r setup round out; do
  case "$setup" in sled*) continue ;; esac
  echo "$setup, round $round:"
  sed 's/^/    /' "$out.statements" 2>/dev/null || true
done <"$RESULTS"

# The wait events seen, over all PostgreSQL runs' windows, for the record.
echo
echo "Wait events (mean backends per sample, each PostgreSQL run's window):"
while IFS=$'\t' read -r setup round out; do
  case "$setup" in sled*) continue ;; esac
  . "$out.window"
  awk -v t0="$t0" -v t1="$t1" -v tag="$setup, round $round" '
    $1 >= t0 && $1 < t1 && NF >= 4 { if (!($1 in seen)) { seen[$1] = 1; s++ } c[$2 " (" $3 ")"] += $4 }
    END { line = tag ":"; for (k in c) if (c[k] / s >= 0.05) line = line sprintf("  %s %.2f", k, c[k] / s); print line }
  ' "$out.waits"
done <"$RESULTS"

# What the replicas wrote on stderr (RUST_LOG=warn): lines, and each distinct
# message with its count (request ids and times dropped).
echo
echo "Replicas' stderr (WARN and ERROR lines), and subject_locks rows after the run:"
while IFS=$'\t' read -r setup round out; do
  case "$setup" in sled*) continue ;; esac
  echo "$setup, round $round: subject_locks rows $(cat "$out.subject_rows" 2>/dev/null || echo '?'); $(cat "$out".replica*.err | grep -cE ' (WARN|ERROR) ' || true) lines"
  cat "$out".replica*.err | grep -E ' (WARN|ERROR) ' \
    | sed -E 's/^[^ ]+ +//; s/request_id="[^"]*" //' | sort | uniq -c | sort -rn | head -5 | sed 's/^/    /' || true
done <"$RESULTS"
