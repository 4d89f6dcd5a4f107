//! The index posting lists of the current write-ahead round, held in memory and
//! written to sled once per round instead of once per commit.
//!
//! Each commit adds, for every index value its entries carry (the child, the
//! actor, the target agency, the action), the seqs of those entries. Inserting
//! them into sled commit by commit cost about a tenth of the gateway's CPU at 64
//! callers: a commit of 16 disclosures touches up to 20 index keys, each landing
//! in a different leaf, and sled 0.34 copies, re-serialises and eventually splits
//! the whole leaf on every insert. Here a commit only appends to in-memory lists;
//! the write-ahead record still carries the commit's lists, so nothing is lost in
//! a crash: the replay adds them again.
//!
//! When the write-ahead file starts over ([`super::wal`]), the round's lists go
//! into sled merged, one key per index value per [`POSTINGS_PER_KEY`] seqs,
//! before sled is synced; a new, empty round then begins at the log's size.
//!
//! Readers take sled's lists for seqs below the round's first seq and the
//! round's lists for the rest, from the one [`RoundPostings`] they loaded. The
//! writer inserts the merged lists into sled *before* it publishes the next
//! round, so a reader holding either round sees every seq exactly once.
//! (A reader of the old round may meet the merged lists in sled as well: it
//! ignores sled's seqs at or above its round's first seq.)
//!
//! Memory: at most one round of the write-ahead file's lists. An entry costs one
//! `u64` in each list it joins (at most four), plus, when it names a child no
//! other entry of the round names, that child's map slot, key and list: 221
//! bytes per entry in all, measured with every entry naming a new child. Such an
//! entry takes 350–420 bytes of the write-ahead file (its sealed canonical bytes,
//! 225–294 for the records flow's entries in a dev gateway, and its child's
//! list), so the lists stay under about two thirds of `wal_bytes`: about 21 MB at
//! the default 32 MiB when every entry names a different child, about 1 MB when a
//! few children recur.

use std::collections::HashMap;
use std::sync::RwLock;

use super::log;
use super::AuditError;

/// The most seqs in one posting list that a round writes to sled (about 1 KiB when
/// its seqs are close; 8 KiB in the earlier layout): a reader paging from a seq
/// decodes at most this many it does not need.
pub(crate) const POSTINGS_PER_KEY: usize = 1024;

/// The posting lists of one write-ahead round.
#[derive(Debug)]
pub(crate) struct RoundPostings {
    /// The round's first seq: seqs below it are in sled's lists, the rest here.
    first_seq: u64,
    /// Index prefix → ascending seqs.
    lists: RwLock<HashMap<Vec<u8>, Vec<u64>>>,
}

impl RoundPostings {
    /// An empty round starting at seq `first_seq` (the log's size).
    pub(crate) fn new(first_seq: u64) -> RoundPostings {
        RoundPostings {
            first_seq,
            lists: Default::default(),
        }
    }

    /// The round's first seq.
    pub(crate) fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Adds a commit's list for one index value: `key` is its sled key (the index
    /// prefix and the list's first seq), `value` its encoded seqs.
    pub(crate) fn add(&self, key: &[u8], value: &[u8]) -> Result<(), AuditError> {
        let prefix = log::posting_prefix(key)?;
        let seqs = log::decode_postings(value)?;
        let mut lists = self.lists.write().unwrap_or_else(|p| p.into_inner());
        let list = lists.entry(prefix.to_vec()).or_default();
        for seq in seqs {
            // A replay may add a commit again (its lists are in the record it
            // replays): keep each seq once, in order.
            if list.last().is_none_or(|&last| seq > last) {
                list.push(seq);
            }
        }
        Ok(())
    }

    /// The round's seqs for `prefix` in `[from, below)`, ascending.
    pub(crate) fn seqs(&self, prefix: &[u8], from: u64, below: u64) -> Vec<u64> {
        let lists = self.lists.read().unwrap_or_else(|p| p.into_inner());
        let Some(list) = lists.get(prefix) else {
            return Vec::new();
        };
        let start = list.partition_point(|&s| s < from);
        let end = list.partition_point(|&s| s < below);
        list.get(start..end)
            .map(<[u64]>::to_vec)
            .unwrap_or_default()
    }

    /// Inserts the round's lists into sled, merged (not synced: the caller syncs
    /// sled before the write-ahead file starts over). Returns how many keys.
    pub(crate) fn write_to(&self, tree: &sled::Tree) -> Result<usize, AuditError> {
        let lists = self.lists.read().unwrap_or_else(|p| p.into_inner());
        let mut keys = 0;
        for (prefix, seqs) in lists.iter() {
            for part in seqs.chunks(POSTINGS_PER_KEY) {
                tree.insert(
                    log::posting_key(prefix.clone(), part[0]),
                    log::encode_postings(part)?,
                )?;
                keys += 1;
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> Vec<u8> {
        log::posting_key(log::action_index_prefix(7), seq)
    }

    #[test]
    fn a_round_keeps_each_seq_once_in_order_and_answers_ranges() {
        let round = RoundPostings::new(10);
        round
            .add(&key(10), &log::encode_postings(&[10, 12]).unwrap())
            .unwrap();
        round
            .add(&key(13), &log::encode_postings(&[13]).unwrap())
            .unwrap();
        // The same commit replayed.
        round
            .add(&key(13), &log::encode_postings(&[13]).unwrap())
            .unwrap();
        let prefix = log::action_index_prefix(7);
        assert_eq!(round.seqs(&prefix, 0, u64::MAX), vec![10, 12, 13]);
        assert_eq!(round.seqs(&prefix, 11, 13), vec![12]);
        assert!(round.seqs(&log::action_index_prefix(8), 0, 99).is_empty());
    }

    #[test]
    fn a_round_goes_to_sled_in_lists_of_at_most_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sled::open(dir.path()).unwrap().open_tree("t").unwrap();
        let round = RoundPostings::new(0);
        let all: Vec<u64> = (0..(2 * POSTINGS_PER_KEY as u64 + 5))
            .map(|s| s * 3)
            .collect();
        for s in &all {
            round
                .add(&key(*s), &log::encode_postings(&[*s]).unwrap())
                .unwrap();
        }
        assert_eq!(round.write_to(&tree).unwrap(), 3);
        let mut back = Vec::new();
        for kv in tree.scan_prefix(log::action_index_prefix(7)) {
            let (k, v) = kv.unwrap();
            let seqs = log::decode_postings(&v).unwrap();
            assert_eq!(k.to_vec(), key(seqs[0]), "keyed by its first seq");
            assert!(seqs.len() <= POSTINGS_PER_KEY);
            back.extend(seqs);
        }
        assert_eq!(back, all);
    }

    #[test]
    fn a_malformed_list_is_refused() {
        let round = RoundPostings::new(0);
        // Neither 8 bytes a seq nor a whole varint list.
        assert!(round.add(&key(0), &[0, 2, 3]).is_err());
        assert!(round.add(&key(0), &[1, 0x80]).is_err());
        assert!(round
            .add(b"k", &log::encode_postings(&[1]).unwrap())
            .is_err());
    }
}
