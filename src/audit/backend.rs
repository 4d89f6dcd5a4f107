//! The audit log as the rest of the gateway sees it: [`AuditStore`]. The sled
//! [`Auditor`] is the embedded default; [`crate::pg::PgAudit`] keeps one log for
//! several gateway replicas in PostgreSQL. Both append with group commit and return
//! a [`Durable`] receipt only after the entry's commit is durable.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::checkpoint::SignedCheckpoint;
use super::merkle::Hash;
use super::query::{self, Filter, Page};
use super::writer::{Auditor, CommitStats, Durable, LogHealth};
use super::{AuditError, NewEntry};
use crate::proto::v1::AuditEntry;

/// Appending to and reading the audit log.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends `entry`; returns once it is durable. On
    /// [`AuditError::Unavailable`] the caller must not disclose anything.
    async fn append(&self, entry: NewEntry) -> Result<Durable, AuditError>;
    /// A signed checkpoint of the log as recent as this store can give.
    async fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError>;
    /// Committed entries.
    async fn size(&self) -> Result<u64, AuditError>;
    /// Entries `[from, to)`, opened, with `canonical` filled in; `to - from` should
    /// be small (a page).
    async fn entries(&self, from: u64, to: u64) -> Result<Vec<AuditEntry>, AuditError>;
    /// Leaf hash and audit path of entry `seq` in the tree of `tree_size`.
    async fn inclusion_proof(
        &self,
        seq: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AuditError>;
    /// Consistency proof between two sizes.
    async fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, AuditError>;
    /// One page of the entries matching `filter` (see [`query::run`]).
    async fn query(
        &self,
        filter: &Filter,
        page_token: &str,
        page_size: usize,
        max_scan: usize,
    ) -> Result<Page, AuditError>;
    /// Changes in writability and size, as this replica sees them.
    fn health(&self) -> watch::Receiver<LogHealth>;
    /// Group-commit statistics of this process.
    fn stats(&self) -> Arc<CommitStats>;
    /// Makes everything durable and stops appending; later appends fail.
    async fn close(&self);
}

/// The shared handle every capability appends through.
pub type AuditHandle = Arc<dyn AuditStore>;

#[async_trait]
impl AuditStore for Auditor {
    async fn append(&self, entry: NewEntry) -> Result<Durable, AuditError> {
        Auditor::append(self, entry).await
    }

    async fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        Auditor::checkpoint(self).await
    }

    async fn size(&self) -> Result<u64, AuditError> {
        Ok(self.log().size())
    }

    async fn entries(&self, from: u64, to: u64) -> Result<Vec<AuditEntry>, AuditError> {
        let log = self.log().clone();
        tokio::task::spawn_blocking(move || (from..to).map(|seq| log.entry(seq)).collect())
            .await
            .map_err(|e| AuditError::Unavailable(format!("audit read task: {e}")))?
    }

    // Proofs read a handful of tiles, nearly always from sled's cache: they run on
    // the calling task.
    async fn inclusion_proof(
        &self,
        seq: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AuditError> {
        self.log().inclusion_proof(seq, tree_size)
    }

    async fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, AuditError> {
        self.log().consistency_proof(from, to)
    }

    async fn query(
        &self,
        filter: &Filter,
        page_token: &str,
        page_size: usize,
        max_scan: usize,
    ) -> Result<Page, AuditError> {
        let log = self.log().clone();
        let (filter, token) = (filter.clone(), page_token.to_owned());
        tokio::task::spawn_blocking(move || query::run(&log, &filter, &token, page_size, max_scan))
            .await
            .map_err(|e| AuditError::Unavailable(format!("audit query task: {e}")))?
    }

    fn health(&self) -> watch::Receiver<LogHealth> {
        Auditor::health(self)
    }

    fn stats(&self) -> Arc<CommitStats> {
        Auditor::stats(self).clone()
    }

    async fn close(&self) {
        Auditor::close(self).await
    }
}
