//! The entry file: the bytes of every entry chunk, appended beside sled.
//!
//! sled 0.34 copies a leaf and logs it again on every insert, so a chunk of a few
//! KiB stored as a sled value was written several times over (46 KB of sled's
//! log per group commit at 64 callers, against 13.5 KB now). Here a chunk is
//! written once, at the end of `audit/entries`, and sled keeps only where it is:
//! its `e` key's value is a [`ChunkPointer`]. A log written before this file has
//! its chunks inline in sled, and those read as before.
//!
//! Like the tile files, the entry file is not synced per commit: a commit's
//! write-ahead record holds its chunks with their offsets, so a crash loses only
//! writes that the replay makes again, at the same offsets. The file is synced with
//! sled before the write-ahead file starts over.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::AuditError;

/// The entry file's name in the audit folder.
pub(crate) const FILE_NAME: &str = "entries";

/// The first byte of a pointer value. An inline chunk starts with the high byte of
/// its first entry's length (a u32 far below 2^24), never this.
const POINTER_TAG: u8 = 0xff;

/// Where a chunk's bytes are in the entry file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkPointer {
    pub offset: u64,
    pub len: u32,
}

impl ChunkPointer {
    const BYTES: usize = 1 + 8 + 4;

    /// The pointer an `e` key's value holds, or `None` for an inline chunk.
    pub(crate) fn decode(value: &[u8]) -> Option<Result<ChunkPointer, AuditError>> {
        tagged(value).map(|tagged| {
            let (offset, rest) = tagged?;
            let len: [u8; 4] = rest.try_into().map_err(|_| malformed())?;
            let len = u32::from_be_bytes(len);
            // A damaged pointer must give an error, not an overflow or a read of
            // gigabytes.
            if len > MAX_CHUNK_BYTES || offset.checked_add(u64::from(len)).is_none() {
                return Err(AuditError::Corrupt(format!(
                    "entry chunk pointer out of range: {len} bytes at byte {offset}"
                )));
            }
            Ok(ChunkPointer { offset, len })
        })
    }

    pub(crate) fn encode(&self) -> [u8; Self::BYTES] {
        let mut v = [POINTER_TAG; Self::BYTES];
        v[1..9].copy_from_slice(&self.offset.to_be_bytes());
        v[9..13].copy_from_slice(&self.len.to_be_bytes());
        v
    }

    /// The byte after the chunk.
    pub(crate) fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The offset and the rest of a value that starts with the pointer tag (a pointer,
/// or a chunk placed in a write-ahead record); `None` for an inline chunk.
fn tagged(value: &[u8]) -> Option<Result<(u64, &[u8]), AuditError>> {
    let rest = value.strip_prefix(&[POINTER_TAG])?;
    Some(
        rest.split_first_chunk::<8>()
            .map(|(offset, rest)| (u64::from_be_bytes(*offset), rest))
            .ok_or_else(malformed),
    )
}

/// No chunk is longer: a chunk is a commit's entries up to `log::CHUNK_BYTES`, or
/// one entry, and an entry's fields are limited to a few KiB each.
const MAX_CHUNK_BYTES: u32 = 64 << 20;

fn malformed() -> AuditError {
    AuditError::Corrupt("malformed entry chunk pointer".into())
}

/// A chunk as a write-ahead record holds it: the pointer's tag and offset, then the
/// chunk's bytes (its length is the rest). Replaying it writes the same bytes at the
/// same offset.
pub(crate) fn placed_chunk(offset: u64, chunk: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + chunk.len());
    v.push(POINTER_TAG);
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(chunk);
    v
}

/// Splits a write-ahead chunk value into its pointer and bytes; `None` for an
/// inline chunk (from a write-ahead file of an earlier version).
pub(crate) fn split_placed(value: &[u8]) -> Option<Result<(ChunkPointer, &[u8]), AuditError>> {
    tagged(value).map(|tagged| {
        let (offset, bytes) = tagged?;
        let len = u32::try_from(bytes.len()).map_err(|_| malformed())?;
        Ok((ChunkPointer { offset, len }, bytes))
    })
}

/// The open entry file.
pub(crate) struct EntryFile {
    file: File,
}

impl EntryFile {
    /// Opens `dir/entries`, creating it (and syncing the folder, so its name
    /// survives a power cut) when absent.
    pub(crate) fn open(dir: &Path) -> Result<EntryFile, AuditError> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("open", e))?;
        if !existed {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("sync its folder", e))?;
        }
        Ok(EntryFile { file })
    }

    /// Writes a chunk where its pointer says (not synced: see the module's notes).
    pub(crate) fn write(&self, at: ChunkPointer, bytes: &[u8]) -> Result<(), AuditError> {
        debug_assert_eq!(bytes.len(), at.len as usize);
        self.file
            .write_all_at(bytes, at.offset)
            .map_err(|e| io("write", e))
    }

    /// The chunk a pointer names.
    pub(crate) fn read(&self, at: ChunkPointer) -> Result<Vec<u8>, AuditError> {
        let mut bytes = vec![0u8; at.len as usize];
        match self.file.read_exact_at(&mut bytes, at.offset) {
            Ok(()) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(AuditError::Corrupt(format!(
                    "the entry file ends before the chunk at byte {} ({} bytes)",
                    at.offset, at.len
                )))
            }
            Err(e) => Err(io("read", e)),
        }
    }

    /// Makes every chunk written so far durable.
    pub(crate) fn sync(&self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(|e| io("fdatasync", e))
    }
}

fn io(what: &str, e: std::io::Error) -> AuditError {
    AuditError::Unavailable(format!("audit entry file: {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pointer_is_never_taken_for_an_inline_chunk() {
        let p = ChunkPointer {
            offset: 1 << 40,
            len: 6000,
        };
        assert_eq!(ChunkPointer::decode(&p.encode()), Some(Ok(p)));
        // An inline chunk: a u32 length, then the sealed entry.
        let mut inline = 300u32.to_be_bytes().to_vec();
        inline.extend_from_slice(&[0xff; 300]);
        assert_eq!(ChunkPointer::decode(&inline), None);
        assert!(matches!(
            ChunkPointer::decode(&[POINTER_TAG, 1, 2]),
            Some(Err(AuditError::Corrupt(_)))
        ));
        let placed = placed_chunk(77, &inline);
        let (at, bytes) = split_placed(&placed).unwrap().unwrap();
        assert_eq!(
            (at.offset, at.len as usize, bytes),
            (77, inline.len(), &inline[..])
        );
        assert_eq!(split_placed(&inline), None);
        // Damage: a length no chunk has, an end past the last byte a file can have.
        for (offset, len) in [(0, u32::MAX), (u64::MAX - 10, 100)] {
            let mut damaged = [POINTER_TAG; ChunkPointer::BYTES];
            damaged[1..9].copy_from_slice(&u64::to_be_bytes(offset));
            damaged[9..13].copy_from_slice(&u32::to_be_bytes(len));
            assert!(matches!(
                ChunkPointer::decode(&damaged),
                Some(Err(AuditError::Corrupt(_)))
            ));
        }
    }

    #[test]
    fn chunks_read_back_and_a_short_file_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let file = EntryFile::open(dir.path()).unwrap();
        let a = ChunkPointer { offset: 0, len: 5 };
        let b = ChunkPointer { offset: 5, len: 3 };
        file.write(a, b"hello").unwrap();
        file.write(b, b"abc").unwrap();
        file.sync().unwrap();
        let reopened = EntryFile::open(dir.path()).unwrap();
        assert_eq!(reopened.read(a).unwrap(), b"hello");
        assert_eq!(reopened.read(b).unwrap(), b"abc");
        let beyond = ChunkPointer { offset: 6, len: 4 };
        assert!(matches!(reopened.read(beyond), Err(AuditError::Corrupt(_))));
    }
}
