//! One durability point shared by concurrent writers: group commit by leader
//! election. A writer applies its sled batch, then calls [`SyncPoint::sync`]; one
//! caller at a time flushes sled and `fdatasync`s the database file, and every
//! writer whose batch was applied before that flush began is answered by it
//! instead of syncing again.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Shares flush + fdatasync among concurrent writers of one sled database.
#[derive(Debug)]
pub struct SyncPoint {
    db: sled::Db,
    file: File,
    /// Writes that have asked to be made durable, counted.
    written: AtomicU64,
    /// The count covered by the last completed sync. Held while syncing.
    durable: Mutex<u64>,
}

impl SyncPoint {
    /// The durability point of `db`, whose log file is `file` (sled 0.34: `<dir>/db`).
    pub fn new(db: sled::Db, file: File) -> Self {
        SyncPoint {
            db,
            file,
            written: AtomicU64::new(0),
            durable: Mutex::new(0),
        }
    }

    /// Returns once everything this caller applied before calling is durable:
    /// sled's flush (which ends in `sync_file_range`, not a cache flush), then
    /// `fdatasync`. Concurrent callers share one sync.
    pub fn sync(&self) -> Result<(), std::io::Error> {
        // Taken after this caller's batch was applied: any sync whose flush starts
        // after it reads a count >= ticket covers that batch.
        let ticket = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        if *durable >= ticket {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        self.db.flush().map_err(std::io::Error::other)?;
        self.file.sync_data()?;
        *durable = target;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_writers_share_syncs_and_every_write_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new()
                .path(dir.path())
                .flush_every_ms(None)
                .open()
                .unwrap();
            let file = File::open(dir.path().join("db")).unwrap();
            let point = Arc::new(SyncPoint::new(db.clone(), file));
            let threads: Vec<_> = (0..8u64)
                .map(|t| {
                    let (db, point) = (db.clone(), point.clone());
                    std::thread::spawn(move || {
                        for i in 0..50u64 {
                            db.insert((t * 1000 + i).to_be_bytes(), vec![1u8; 64])
                                .unwrap();
                            point.sync().unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(db.len(), 400);
    }
}
