//! Lease rows: one holder at a time per name across every replica, until the lease
//! expires by the database's clock (one clock for all replicas, so their skew does
//! not matter). Used for checkpoint signing today; the retention and deadline
//! sweepers can use the same rows.
//!
//! A lease is taken and renewed in one transaction: make sure the row exists
//! (`INSERT ... ON CONFLICT DO NOTHING`), lock it (`SELECT ... FOR UPDATE`), and take
//! it if it is ours or has expired. Work that must happen only under the lease
//! checks it inside its own transaction with [`Lease::held_in`], which keeps the row
//! locked until that transaction ends, so a lease cannot change hands half-way.

use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use tokio_postgres::IsolationLevel;

use super::describe;
use crate::audit::AuditError;

/// A named lease that this replica (`holder`) tries to hold.
#[derive(Debug, Clone)]
pub struct Lease {
    pool: Pool,
    name: String,
    holder: String,
    ttl: Duration,
}

impl Lease {
    /// A lease called `name`, held as `holder` (unique per replica: e.g. host name
    /// and process id) for `ttl` from each renewal.
    pub fn new(pool: Pool, name: &str, holder: &str, ttl: Duration) -> Lease {
        Lease {
            pool,
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl,
        }
    }

    /// Who this replica is.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes the lease if it is free or expired, or renews it if held by us.
    /// Returns whether we hold it now.
    pub async fn try_acquire(&self) -> Result<bool, AuditError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(pg_error)?;
        tx.execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, '', '-infinity') \
             ON CONFLICT (name) DO NOTHING",
            &[&self.name],
        )
        .await
        .map_err(pg_error)?;
        let row = tx
            .query_one(
                "SELECT holder, expires_at > clock_timestamp() FROM leases WHERE name = $1 FOR UPDATE",
                &[&self.name],
            )
            .await
            .map_err(pg_error)?;
        let (holder, live): (&str, bool) = (row.get(0), row.get(1));
        let ours = holder == self.holder || !live;
        if ours {
            let ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
            tx.execute(
                "UPDATE leases SET holder = $2, expires_at = clock_timestamp() + $3 * interval '1 millisecond' \
                 WHERE name = $1",
                &[&self.name, &self.holder, &(ms as f64)],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(ours)
    }

    /// Gives the lease up if we hold it, so another replica can take it at once.
    pub async fn release(&self) -> Result<(), AuditError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute(
                "UPDATE leases SET expires_at = '-infinity' WHERE name = $1 AND holder = $2",
                &[&self.name, &self.holder],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Inside the caller's transaction: whether we hold the lease now. Locks the row
    /// (`FOR UPDATE`) until that transaction ends, so nobody takes the lease over
    /// before the caller's work commits.
    pub async fn held_in<C: GenericClient>(&self, tx: &C) -> Result<bool, tokio_postgres::Error> {
        Ok(tx
            .query_opt(
                "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 \
                 AND expires_at > clock_timestamp() FOR UPDATE",
                &[&self.name, &self.holder],
            )
            .await?
            .is_some())
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> AuditError {
    AuditError::Unavailable(format!("postgres: {e}"))
}

fn pg_error(e: tokio_postgres::Error) -> AuditError {
    AuditError::Unavailable(format!("postgres: {}", describe(&e)))
}
