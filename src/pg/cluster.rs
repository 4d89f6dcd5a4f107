//! What every replica must apply at once: revocations and operator-triggered TLS
//! reloads. Each replica runs [`PgCluster::run`], which every [`TICK`] applies the
//! CERTIFICATE_REVOKED entries any replica appended to the shared log, reloads its
//! TLS files when the cluster's TLS generation moved on, and reports both (and that
//! it is alive) in its row of `replicas`. The replica that took the operator's call
//! waits until every live replica has reported the change before it answers, so
//! the change is in force everywhere for the very next call.
//!
//! Polling, not LISTEN/NOTIFY: one indexed read and at most one small write per tick,
//! and nothing to reconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::describe;

/// How often a replica looks for changes.
pub const TICK: Duration = Duration::from_millis(200);
/// A replica that has not reported for this long is not waited for.
pub const LIVE_FOR: Duration = Duration::from_secs(3);
/// The longest an operator's call waits for the other replicas.
pub const WAIT_AT_MOST: Duration = Duration::from_secs(5);
/// How often a replica reports that it is alive when nothing changed.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What a replica applies when told to: implemented by the gateway.
#[async_trait::async_trait]
pub trait Member: Send + Sync + 'static {
    /// Applies revocations appended since the last call; returns the log size they
    /// were read up to.
    async fn apply_revocations(&self) -> Result<u64, String>;
    /// Reloads the TLS files (audited by the caller); `Err` names why not.
    async fn reload_tls(&self) -> Result<(), String>;
}

/// This replica's place in the cluster.
pub struct PgCluster {
    pool: Pool,
    replica: String,
    /// The TLS generation this replica has applied (or refused).
    tls_generation: AtomicU64,
    tls_error: Mutex<Option<String>>,
}

impl PgCluster {
    /// This replica, `replica` by name.
    pub fn new(pool: Pool, replica: &str) -> Self {
        PgCluster {
            pool,
            replica: replica.to_owned(),
            tls_generation: AtomicU64::new(0),
            tls_error: Mutex::new(None),
        }
    }

    /// Applies changes and reports, every [`TICK`], until `stop`; then removes this
    /// replica's row so nobody waits for it.
    pub async fn run(self: Arc<Self>, member: Arc<dyn Member>, stop: CancellationToken) {
        match self.cluster_generation().await {
            // A replica starts with the TLS files as they are now: no reload owed.
            Ok(g) => self.tls_generation.store(g, Ordering::Release),
            Err(e) => tracing::warn!(error = %e, "cannot read the cluster's TLS generation"),
        }
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: Option<(u64, u64)> = None;
        let mut reported_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let revoked_upto = match member.apply_revocations().await {
                Ok(upto) => upto,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read revocations from the shared log");
                    continue;
                }
            };
            if let Ok(g) = self.cluster_generation().await {
                if g > self.tls_generation.load(Ordering::Acquire) {
                    let result = member.reload_tls().await;
                    *self.tls_error.lock().unwrap_or_else(|p| p.into_inner()) = result.err();
                    self.tls_generation.fetch_max(g, Ordering::AcqRel);
                }
            }
            let now = (revoked_upto, self.tls_generation.load(Ordering::Acquire));
            if reported == Some(now) && reported_at.elapsed() < HEARTBEAT {
                continue;
            }
            match self.report(now.0, now.1).await {
                Ok(()) => {
                    reported = Some(now);
                    reported_at = tokio::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "cannot report to the cluster"),
            }
        }
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute("DELETE FROM replicas WHERE name = $1", &[&self.replica])
                .await;
        }
    }

    async fn report(&self, revoked_upto: u64, tls_generation: u64) -> Result<(), String> {
        let error = self
            .tls_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        client
            .execute(
                "INSERT INTO replicas (name, revoked_upto, tls_generation, tls_error, seen_at) \
                 VALUES ($1, $2, $3, $4, clock_timestamp()) \
                 ON CONFLICT (name) DO UPDATE SET revoked_upto = EXCLUDED.revoked_upto, \
                 tls_generation = EXCLUDED.tls_generation, tls_error = EXCLUDED.tls_error, \
                 seen_at = EXCLUDED.seen_at",
                &[
                    &self.replica,
                    &(revoked_upto as i64),
                    &(tls_generation as i64),
                    &error,
                ],
            )
            .await
            .map_err(|e| describe(&e))?;
        Ok(())
    }

    async fn cluster_generation(&self) -> Result<u64, String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one("SELECT tls_generation FROM cluster_state WHERE id = 1", &[])
            .await
            .map_err(|e| describe(&e))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    /// Waits until every live replica has applied the revocation audited at `seq`.
    /// `Err` names the replicas that had not after [`WAIT_AT_MOST`] (they apply it
    /// at their next look at the log, or when they restart).
    pub async fn await_revocation(&self, seq: u64) -> Result<(), String> {
        self.await_replicas(
            "SELECT name FROM replicas WHERE seen_at > clock_timestamp() - $1 * interval '1 millisecond' \
             AND revoked_upto <= $2 ORDER BY name",
            seq as i64,
        )
        .await
        .map(|_| ())
    }

    /// Asks every replica to reload its TLS files: this one is marked as having
    /// done so already (its caller reloads it). Returns the new generation.
    pub async fn start_tls_reload(&self) -> Result<u64, String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                "UPDATE cluster_state SET tls_generation = tls_generation + 1 WHERE id = 1 \
                 RETURNING tls_generation",
                &[],
            )
            .await
            .map_err(|e| describe(&e))?;
        let g = row.get::<_, i64>(0).max(0) as u64;
        self.tls_generation.fetch_max(g, Ordering::AcqRel);
        Ok(g)
    }

    /// Waits until every other live replica has reloaded for `generation`; returns
    /// the replicas that refused the new files, with why.
    pub async fn await_tls_reload(&self, generation: u64) -> Result<Vec<(String, String)>, String> {
        self.await_replicas(
            "SELECT name FROM replicas WHERE seen_at > clock_timestamp() - $1 * interval '1 millisecond' \
             AND tls_generation < $2 ORDER BY name",
            generation as i64,
        )
        .await?;
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT name, tls_error FROM replicas WHERE tls_generation >= $1 \
                 AND tls_error IS NOT NULL AND name <> $2 ORDER BY name",
                &[&(generation as i64), &self.replica],
            )
            .await
            .map_err(|e| describe(&e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn await_replicas(&self, behind: &str, mark: i64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + WAIT_AT_MOST;
        let live_ms = LIVE_FOR.as_millis() as f64;
        loop {
            let lagging: Vec<String> = {
                let client = self.pool.get().await.map_err(|e| e.to_string())?;
                client
                    .query(behind, &[&live_ms, &mark])
                    .await
                    .map_err(|e| describe(&e))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            };
            if lagging.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "replicas {} had not applied it after {} s",
                    lagging.join(", "),
                    WAIT_AT_MOST.as_secs()
                ));
            }
            tokio::time::sleep(TICK / 2).await;
        }
    }
}
