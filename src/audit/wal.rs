//! The audit log's write-ahead file: the durability point of a group commit.
//!
//! sled 0.34 makes a batch durable with `flush`, which hands its log buffer to its
//! I/O threads, waits for them and ends in `sync_file_range`; an `fdatasync` of its
//! file then empties the disk's cache. Per commit that was two I/O round trips and
//! several thread wake-ups, about a third of a disclosure's server CPU in profiles.
//! Instead, each commit's sled inserts are first written as one record to this file,
//! which the writer thread `fdatasync`s itself; only then is the batch applied to
//! sled (in memory; sled writes its buffers out as they fill) and the callers are
//! answered. Once the file holds `capacity` bytes of records, sled is flushed and
//! synced and the file starts over from its first record.
//!
//! Layout: a header block of [`HEADER_BYTES`], then records back to back.
//!
//! | header bytes | |
//! | --- | --- |
//! | 0..8 | magic `sgw-wal1` |
//! | 8..16 | the lsn of this round's first record (u64) |
//! | 16..20 | CRC-32 of bytes 0..16 |
//!
//! | record | |
//! | --- | --- |
//! | u32 | payload length (never 0) |
//! | u32 | CRC-32 of lsn ‖ payload |
//! | u64 | lsn: the round's first, then one more per record |
//! | payload | the batch's inserts: (u32 key length, key, u32 value length, value)* |
//!
//! Integers are big-endian. Replay reads records from the header's lsn on and stops
//! at the first that is short, fails its CRC or carries another lsn: a torn tail,
//! the zeros the file is extended with, or a record of an earlier round not yet
//! overwritten (its lsn is lower). Each record is a batch that sled may already
//! hold; applying it again writes the same values, and applying every record in
//! order leaves sled as it was after the last one. The header is rewritten, and
//! synced, only once sled holds every record before it durably, so a torn header
//! loses nothing.
//!
//! The file is extended with zeros [`EXTEND_BYTES`] at a time, ahead of the records,
//! so that after its first round the `fdatasync` of a commit writes data only, not
//! the file's size.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::AuditError;

/// The file's name, inside the audit sled folder (sled leaves files it does not
/// know alone).
pub(crate) const FILE_NAME: &str = "sgw-audit.wal";

const MAGIC: &[u8; 8] = b"sgw-wal1";
/// The header's block: records start here.
pub(crate) const HEADER_BYTES: u64 = 4096;
/// How far the file is extended with zeros at a time.
pub(crate) const EXTEND_BYTES: u64 = 4 << 20;
/// A record's length, CRC and lsn.
const RECORD_HEAD: usize = 16;
/// No record is larger: a commit is at most `max_batch` entries, each well under
/// a mebibyte. A length beyond this is garbage, not a record.
const MAX_RECORD: usize = 1 << 30;

/// The default bytes of records before the file starts over.
pub const DEFAULT_CAPACITY: u64 = 32 << 20;

fn unavailable(what: &str, e: std::io::Error) -> AuditError {
    AuditError::Unavailable(format!("audit write-ahead file: {what}: {e}"))
}

/// The open file, positioned after its last record.
pub(crate) struct Wal {
    file: File,
    /// Where the next record goes.
    pos: u64,
    /// The file's length: zeros from `pos` to here.
    allocated: u64,
    next_lsn: u64,
    /// Once `pos` passes `HEADER_BYTES + capacity`, the owner should start over.
    capacity: u64,
    /// Reused for each record.
    buf: Vec<u8>,
}

/// One sled insert of a batch.
pub(crate) type Insert = (Vec<u8>, Vec<u8>);

/// The path of the file in the audit sled folder `dir`.
pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

impl Wal {
    /// Opens the file in `dir` (creating it), calls `apply` with the inserts of
    /// every record of its current round, in order, and returns it positioned
    /// after the last. The caller must make what `apply` wrote durable and then
    /// call [`Wal::start_over`] before it appends.
    pub(crate) fn open(
        dir: &Path,
        capacity: u64,
        mut apply: impl FnMut(Vec<Insert>) -> Result<(), AuditError>,
    ) -> Result<(Wal, u64), AuditError> {
        let path = path(dir);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| unavailable("open", e))?;
        // The file's name must survive a power cut as well as its contents.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| unavailable("sync its folder", e))?;
        let allocated = file.metadata().map_err(|e| unavailable("stat", e))?.len();
        let mut wal = Wal {
            file,
            pos: HEADER_BYTES,
            allocated,
            next_lsn: 0,
            capacity: capacity.max(1),
            buf: Vec::new(),
        };
        let mut replayed = 0;
        if let Some(first) = wal.read_header()? {
            let mut reader = BufReader::with_capacity(1 << 20, &wal.file);
            let mut skip = [0u8; HEADER_BYTES as usize];
            if reader.read_exact(&mut skip).is_ok() {
                let mut lsn = first;
                while let Some(inserts) = read_record(&mut reader, lsn)? {
                    apply(inserts)?;
                    lsn += 1;
                    replayed += 1;
                }
            }
            wal.next_lsn = first + replayed;
        } else {
            // A new file, or a header torn while starting a round, when sled held
            // everything: what is left in the file is stale, and records of an
            // earlier round must not line up with the new round's lsns.
            wal.file
                .set_len(0)
                .and_then(|()| wal.file.sync_all())
                .map_err(|e| unavailable("truncate", e))?;
            wal.allocated = 0;
        }
        Ok((wal, replayed))
    }

    /// The header's first lsn, or `None` if there is no valid header (a new file,
    /// or a torn header write, after which nothing needs replaying).
    fn read_header(&self) -> Result<Option<u64>, AuditError> {
        let mut header = [0u8; 20];
        match self.file.read_exact_at(&mut header, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(unavailable("read", e)),
        }
        if &header[..8] != MAGIC || crc(&[&header[..16]]) != be32(&header[16..20]) {
            return Ok(None);
        }
        Ok(Some(be64(&header[8..16])))
    }

    /// Starts a new round: only to be called once everything every record so far
    /// holds is durable elsewhere. Writes and syncs a header whose first lsn is
    /// past every record in the file.
    pub(crate) fn start_over(&mut self) -> Result<(), AuditError> {
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&self.next_lsn.to_be_bytes());
        let sum = crc(&[&header[..16]]);
        header[16..20].copy_from_slice(&sum.to_be_bytes());
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| unavailable("write", e))?;
        self.allocated = self.allocated.max(HEADER_BYTES);
        self.file
            .sync_data()
            .map_err(|e| unavailable("fdatasync", e))?;
        self.pos = HEADER_BYTES;
        Ok(())
    }

    /// Appends the batch as one record and syncs it: once this returns, the batch
    /// survives a crash.
    pub(crate) fn append(&mut self, inserts: &[Insert]) -> Result<(), AuditError> {
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(&[0u8; RECORD_HEAD]);
        for (key, value) in inserts {
            buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
            buf.extend_from_slice(key);
            buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
            buf.extend_from_slice(value);
        }
        let payload = buf.len() - RECORD_HEAD;
        if payload == 0 || payload > MAX_RECORD {
            return Err(AuditError::Unavailable(format!(
                "audit write-ahead record of {payload} bytes"
            )));
        }
        let lsn = self.next_lsn.to_be_bytes();
        let sum = crc(&[&lsn, &buf[RECORD_HEAD..]]);
        buf[..4].copy_from_slice(&(payload as u32).to_be_bytes());
        buf[4..8].copy_from_slice(&sum.to_be_bytes());
        buf[8..16].copy_from_slice(&lsn);
        let end = self.pos + buf.len() as u64;
        if end > self.allocated {
            // Zeros ahead, so the next rounds overwrite in place; synced below
            // with the record.
            let to = end.div_ceil(EXTEND_BYTES) * EXTEND_BYTES;
            static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
            while self.allocated < to {
                let n = ZEROS.len().min((to - self.allocated) as usize);
                self.file
                    .write_all_at(&ZEROS[..n], self.allocated)
                    .map_err(|e| unavailable("extend", e))?;
                self.allocated += n as u64;
            }
        }
        self.file
            .write_all_at(buf, self.pos)
            .map_err(|e| unavailable("write", e))?;
        self.file
            .sync_data()
            .map_err(|e| unavailable("fdatasync", e))?;
        self.pos = end;
        self.next_lsn += 1;
        Ok(())
    }

    /// Whether the round is full: the owner should make sled durable and call
    /// [`Wal::start_over`].
    pub(crate) fn is_full(&self) -> bool {
        self.pos - HEADER_BYTES >= self.capacity
    }
}

/// The next record if it is whole, has a good CRC and carries `lsn`.
fn read_record(reader: &mut impl Read, lsn: u64) -> Result<Option<Vec<Insert>>, AuditError> {
    let mut head = [0u8; RECORD_HEAD];
    if reader.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let len = be32(&head[..4]) as usize;
    if len == 0 || len > MAX_RECORD || be64(&head[8..16]) != lsn {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    if reader.read_exact(&mut payload).is_err() {
        return Ok(None);
    }
    if crc(&[&head[8..16], &payload]) != be32(&head[4..8]) {
        return Ok(None);
    }
    // A good CRC over a malformed payload is not a torn write: the file was
    // written by something else.
    let malformed = || AuditError::Corrupt(format!("audit write-ahead record {lsn} is malformed"));
    let mut inserts = Vec::new();
    let mut rest = payload.as_slice();
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>, AuditError> {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(malformed());
        }
        let (bytes, tail) = tail.split_at(len);
        *rest = tail;
        Ok(bytes.to_vec())
    };
    while !rest.is_empty() {
        let key = take(&mut rest)?;
        let value = take(&mut rest)?;
        inserts.push((key, value));
    }
    Ok(Some(inserts))
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(dir: &Path) -> (Wal, Vec<Vec<Insert>>) {
        let mut seen = Vec::new();
        let (wal, n) = Wal::open(dir, 1 << 20, |i| {
            seen.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(n as usize, seen.len());
        (wal, seen)
    }

    fn batch(n: u8) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (vec![b'k', n], vec![n; 3 + n as usize]),
            (b"m".to_vec(), vec![n]),
        ]
    }

    fn append(wal: &mut Wal, n: u8) {
        wal.append(&batch(n)).unwrap();
    }

    #[test]
    fn a_new_file_replays_nothing_and_records_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, seen) = replay(dir.path());
        assert!(seen.is_empty());
        wal.start_over().unwrap();
        for n in 0..5 {
            append(&mut wal, n);
        }
        drop(wal);
        let (_, seen) = replay(dir.path());
        assert_eq!(seen, (0..5).map(batch).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_or_corrupt_record_ends_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = replay(dir.path());
        wal.start_over().unwrap();
        let mut ends = vec![wal.pos];
        for n in 0..4 {
            append(&mut wal, n);
            ends.push(wal.pos);
        }
        drop(wal);
        let file = OpenOptions::new()
            .write(true)
            .open(path(dir.path()))
            .unwrap();
        // A bit flipped in the third record's payload.
        file.write_all_at(&[0xff], ends[2] + RECORD_HEAD as u64 + 2)
            .unwrap();
        let (_, seen) = replay(dir.path());
        assert_eq!(seen, vec![batch(0), batch(1)]);
        // Cut short inside the second record.
        file.set_len(ends[1] + 5).unwrap();
        let (_, seen) = replay(dir.path());
        assert_eq!(seen, vec![batch(0)]);
    }

    #[test]
    fn a_new_round_never_replays_the_last_rounds_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = replay(dir.path());
        wal.start_over().unwrap();
        for n in 0..6 {
            append(&mut wal, n);
        }
        // sled now holds all six durably; the new round overwrites two.
        wal.start_over().unwrap();
        append(&mut wal, 10);
        append(&mut wal, 11);
        drop(wal);
        let (mut wal, seen) = replay(dir.path());
        // Records 2..5 of the old round are still in the file, after these two.
        assert_eq!(seen, vec![batch(10), batch(11)]);
        // The round after a replay goes on from the replayed lsns.
        wal.start_over().unwrap();
        append(&mut wal, 20);
        drop(wal);
        let (_, seen) = replay(dir.path());
        assert_eq!(seen, vec![batch(20)]);
    }

    #[test]
    fn a_torn_header_replays_nothing_and_no_old_record_lines_up_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = replay(dir.path());
        wal.start_over().unwrap();
        for n in 0..3 {
            append(&mut wal, n);
        }
        drop(wal);
        let file = OpenOptions::new()
            .write(true)
            .open(path(dir.path()))
            .unwrap();
        file.write_all_at(&[0x55], 9).unwrap();
        let (mut wal, seen) = replay(dir.path());
        assert!(seen.is_empty());
        // The new round starts at lsn 0 again, with a record the size of the old
        // first one: the old second record (lsn 1) must not follow it.
        wal.start_over().unwrap();
        append(&mut wal, 0);
        drop(wal);
        let (_, seen) = replay(dir.path());
        assert_eq!(seen, vec![batch(0)]);
    }

    #[test]
    fn the_file_grows_in_zeroed_steps_and_reports_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 64, |_| Ok(())).unwrap();
        wal.start_over().unwrap();
        append(&mut wal, 1);
        let len = std::fs::metadata(path(dir.path())).unwrap().len();
        assert_eq!(len, EXTEND_BYTES);
        assert!(!wal.is_full());
        for n in 2..6 {
            append(&mut wal, n);
        }
        assert!(wal.is_full());
    }
}
