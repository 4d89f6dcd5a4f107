//! Writing the flat files out while a write-ahead round fills, not all at its end.
//!
//! Entry chunks and Merkle tiles go to their files without a sync; the round end
//! ([`super::writer`]) makes them durable before the write-ahead file starts over,
//! and every commit waits for it. The kernel holds their dirty pages for up to 30
//! seconds, so that `fdatasync` found a whole round's worth (about 32 MiB at the
//! default `wal_bytes`) still to write: 20 ms or more of the writer's time, every
//! two seconds at 64 callers, in which no caller was answered. Here a thread of its
//! own syncs both files each time [`EARLY_SYNC_BYTES`] more have been written, and
//! the round end finds at most about that much left.
//!
//! The round end still syncs both files itself, and learns of any failure here:
//! once an `fdatasync` has reported a write error, the kernel may not report it to
//! the next, so an error seen by this thread is kept and returned by
//! [`EarlySync::sync_now`]. The round then fails as if its own sync had, and the
//! write-ahead file, which still holds every commit of the round, is replayed when
//! the store reopens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::entry_file::EntryFile;
use super::tiles::TileFiles;
use super::AuditError;

/// Bytes of entry chunks written between two early syncs.
pub(crate) const EARLY_SYNC_BYTES: u64 = 2 << 20;

/// The files to sync, and the first failure of a sync nobody has reported yet.
struct Files {
    entries: Arc<EntryFile>,
    tiles: Arc<TileFiles>,
    /// Held for the whole of each sync, so that [`EarlySync::sync_now`] never
    /// checks for a failure while a sync that might fail is still running.
    failed: Mutex<Option<AuditError>>,
    /// Set when the store lets go: a wake-up still queued then is not acted on.
    stop: AtomicBool,
    /// Early syncs made.
    done: AtomicU64,
}

impl Files {
    fn sync(&self) -> Result<(), AuditError> {
        self.tiles.sync()?;
        self.entries.sync()
    }
}

/// The syncing thread of one open store. Dropping it waits for the sync the thread
/// may be running, and starts no other.
pub(crate) struct EarlySync {
    files: Arc<Files>,
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Entry file offset past which the next early sync is asked for.
    next_at: u64,
}

impl EarlySync {
    /// Starts the thread for `entries` and `tiles`, whose entry file ends at
    /// `entries_end`. If the thread cannot be started, every sync happens at the
    /// round end, as without it.
    pub(crate) fn start(
        entries: Arc<EntryFile>,
        tiles: Arc<TileFiles>,
        entries_end: u64,
    ) -> EarlySync {
        let files = Arc::new(Files {
            entries,
            tiles,
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
        });
        // One pending wake-up is enough: a sync that starts later covers
        // everything written before it.
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let thread = {
            let files = files.clone();
            std::thread::Builder::new()
                .name("sgw-audit-sync".into())
                .spawn(move || {
                    while woken.recv().is_ok() && !files.stop.load(Ordering::Acquire) {
                        let mut failed = files.failed.lock().unwrap_or_else(|p| p.into_inner());
                        if failed.is_none() {
                            match files.sync() {
                                Ok(()) => {
                                    files.done.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "early sync of the audit files failed; the round end will fail");
                                    *failed = Some(e);
                                }
                            }
                        }
                    }
                })
        };
        let (wake, thread) = match thread {
            Ok(thread) => (Some(wake), Some(thread)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the audit sync thread; syncing at round ends only");
                (None, None)
            }
        };
        EarlySync {
            files,
            wake,
            thread,
            next_at: entries_end.saturating_add(EARLY_SYNC_BYTES),
        }
    }

    /// Told after each commit where the entry file now ends: asks the thread for a
    /// sync once another [`EARLY_SYNC_BYTES`] have been written. Never waits.
    pub(crate) fn written_to(&mut self, entries_end: u64) {
        if entries_end < self.next_at {
            return;
        }
        self.next_at = entries_end.saturating_add(EARLY_SYNC_BYTES);
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                // Full: a sync is already asked for and will cover this.
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => self.wake = None,
            }
        }
    }

    /// Makes both files durable now, on the caller's thread, after any early sync
    /// that is running. Fails if that sync, or any before it, failed.
    pub(crate) fn sync_now(&self) -> Result<(), AuditError> {
        let failed = self.files.failed.lock().unwrap_or_else(|p| p.into_inner());
        // Kept, not taken: what failed stays unsynced until the store is reopened.
        if let Some(e) = failed.as_ref() {
            return Err(e.clone());
        }
        self.files.sync()
    }
}

impl Drop for EarlySync {
    fn drop(&mut self) {
        self.files.stop.store(true, Ordering::Release);
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::entry_file::ChunkPointer;

    #[test]
    fn a_sync_is_asked_for_once_per_interval_and_a_failure_reaches_the_round_end() {
        let dir = tempfile::tempdir().unwrap();
        let entries = Arc::new(EntryFile::open(dir.path()).unwrap());
        let tiles = Arc::new(TileFiles::open(dir.path()));
        let mut early = EarlySync::start(entries.clone(), tiles, 0);
        entries
            .write(ChunkPointer { offset: 0, len: 3 }, b"abc")
            .unwrap();
        early.written_to(3);
        assert_eq!(early.next_at, EARLY_SYNC_BYTES, "not yet due");
        assert_eq!(early.files.done.load(Ordering::Relaxed), 0);
        early.written_to(EARLY_SYNC_BYTES + 1);
        assert_eq!(early.next_at, 2 * EARLY_SYNC_BYTES + 1);
        // The thread syncs on its own.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while early.files.done.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "no early sync");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        early.sync_now().unwrap();

        // A failure seen by the thread is returned by the round end's sync, and
        // again by every later one.
        *early.files.failed.lock().unwrap() =
            Some(AuditError::Unavailable("fdatasync: EIO".into()));
        for _ in 0..2 {
            match early.sync_now() {
                Err(AuditError::Unavailable(m)) => assert!(m.contains("EIO"), "{m}"),
                other => panic!("expected the kept failure, got {other:?}"),
            }
        }
    }
}
