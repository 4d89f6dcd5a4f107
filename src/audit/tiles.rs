//! Where the Merkle nodes live: tall tiles in flat files ([`TileFiles`]), the right
//! edge in memory.
//!
//! A *tile* holds the nodes of [`TILE_HEIGHT`] (`H` = 4) consecutive levels above
//! `W = 2^H` = 16 consecutive nodes of its lowest level: tier `T` covers levels
//! `HT..HT+H-1`, and tile `j` of tier `T` holds node `(HT + h, i)` for `i` in
//! `[j·W/2^h, (j+1)·W/2^h)`, row by row (16 + 8 + 4 + 2 = 30 hashes, 960 bytes).
//! The node above a tile (its root, level `HT + H`) is in the lowest row of tier
//! `T + 1`. An inclusion proof at 10^6 entries then touches one tile per tier
//! (five) instead of one tile per level (twenty), and only the tier-0 tile is
//! likely to need sled: the tiers above are one tile per 256 entries, which
//! [`TileCache`] keeps. (Measured against height 6: the same at 10^6, where the
//! one tier-0 read dominates, and half the time at 10^4.)
//!
//! Only **full** tiles are stored, once, by the commit that completes them: nodes
//! never change once complete, so a full tile never changes either. The partial
//! tile of each tier (the tree's right edge, at most 30 hashes per tier) lives in
//! memory as an [`Edge`], which the writer updates and publishes after each commit
//! and rebuilds from the stored entries and full tiles when it opens the log. A
//! commit thus writes only the tiles it completes (about one in 15 entries), never
//! rewrites a partial tile, and never reads a tile back to extend it.
//!
//! Every node a proof of any size up to the edge's asks for is either in a
//! partial tile of the edge or in a full tile stored before the edge was
//! published. The root of the edge's own size is in the edge alone: a complete
//! subtree of the size's decomposition that sat in a full tile would be part of a
//! larger complete subtree (the tile's), so it would not be in the decomposition.

use std::cell::RefCell;
use std::sync::{Arc, RwLock};

use super::merkle::{node_hash, Hash, NodeSource};
use super::AuditError;

/// Levels per tile.
pub(crate) const TILE_HEIGHT: u8 = 4;
/// Nodes in a tile's lowest row.
pub(crate) const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;
/// Hashes in a full tile.
pub(crate) const TILE_NODES: usize = 2 * TILE_WIDTH as usize - 2;
/// Bytes of a stored (full) tile.
pub(crate) const TILE_BYTES: usize = TILE_NODES * 32;

/// The key tag of stored tiles.
pub(crate) const NODE: u8 = b'n';

/// A tile: its tier and its index within the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TileId {
    pub tier: u8,
    pub index: u64,
}

/// Where node `(level, index)` sits: its tile, its row in the tile, its slot in
/// the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    tile: TileId,
    row: u8,
    slot: u64,
}

impl Place {
    fn of(level: u8, index: u64) -> Place {
        let row = level % TILE_HEIGHT;
        let shift = TILE_HEIGHT - row;
        Place {
            tile: TileId {
                tier: level / TILE_HEIGHT,
                index: index >> shift,
            },
            row,
            slot: index & ((1 << shift) - 1),
        }
    }

    /// The node's position in the tile, in hashes.
    fn position(&self) -> usize {
        row_start(self.row) + self.slot as usize
    }

    /// Whether the node is complete when the tile's lowest row has `filled` nodes.
    fn complete_in(&self, filled: u64) -> bool {
        self.slot < filled >> self.row
    }
}

/// The position of row `row`'s first hash in a tile.
fn row_start(row: u8) -> usize {
    let width = 2 * TILE_WIDTH as usize;
    width - (width >> row)
}

/// The sled key of a stored tile.
pub(crate) fn tile_key(tile: TileId) -> [u8; 10] {
    let mut k = [NODE; 10];
    k[1] = tile.tier;
    k[2..].copy_from_slice(&tile.index.to_be_bytes());
    k
}

fn hash_at(bytes: &[u8], position: usize) -> Option<Hash> {
    bytes
        .get(position * 32..position * 32 + 32)
        .and_then(|h| h.try_into().ok())
}

fn missing(level: u8, index: u64) -> AuditError {
    AuditError::Corrupt(format!("missing Merkle node {level}/{index}"))
}

/// The partial tile of one tier: `filled` nodes of its lowest row are complete,
/// and with them every node above them in the tile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartialTile {
    pub id: TileId,
    pub filled: u64,
    hashes: Vec<Hash>,
}

impl PartialTile {
    fn empty(id: TileId) -> PartialTile {
        PartialTile {
            id,
            filled: 0,
            hashes: vec![[0; 32]; TILE_NODES],
        }
    }

    /// A partial tile from the complete nodes of its lowest row (fewer than [`TILE_WIDTH`]).
    fn from_lowest_row(id: TileId, lowest: &[Hash]) -> PartialTile {
        let mut tile = PartialTile::empty(id);
        tile.filled = lowest.len() as u64;
        tile.hashes[..lowest.len()].copy_from_slice(lowest);
        for row in 1..TILE_HEIGHT {
            let (below, here) = (row_start(row - 1), row_start(row));
            for k in 0..(tile.filled >> row) as usize {
                tile.hashes[here + k] =
                    node_hash(&tile.hashes[below + 2 * k], &tile.hashes[below + 2 * k + 1]);
            }
        }
        tile
    }

    fn bytes(&self) -> Vec<u8> {
        self.hashes.iter().flatten().copied().collect()
    }
}

/// The right edge of the tree: the partial tile of every tier, and the tree size
/// they describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Edge {
    pub size: u64,
    pub tiers: Vec<PartialTile>,
}

impl Default for Edge {
    fn default() -> Self {
        Edge {
            size: 0,
            tiers: vec![PartialTile::empty(TileId { tier: 0, index: 0 })],
        }
    }
}

impl Edge {
    /// Rebuilds the edge of a stored tree of `size` leaves from the leaf hashes
    /// of its last partial tile (`size % TILE_WIDTH` of them) and its stored full tiles.
    pub(crate) fn rebuild(
        size: u64,
        last_leaves: &[Hash],
        tiles: &dyn FullTiles,
    ) -> Result<Edge, AuditError> {
        if last_leaves.len() as u64 != size % TILE_WIDTH {
            return Err(AuditError::Corrupt(
                "wrong number of leaves to rebuild the tree's edge".into(),
            ));
        }
        let mut tiers = vec![PartialTile::from_lowest_row(
            TileId {
                tier: 0,
                index: size / TILE_WIDTH,
            },
            last_leaves,
        )];
        let mut tier = 1u8;
        loop {
            // The lowest row of tier T: one node per full tile of tier T-1.
            let below = size >> (u32::from(TILE_HEIGHT) * u32::from(tier));
            if below == 0 {
                break;
            }
            let index = below / TILE_WIDTH;
            let lowest = (index * TILE_WIDTH..below)
                .map(|i| {
                    let id = TileId {
                        tier: tier - 1,
                        index: i,
                    };
                    let bytes = read_full_tile(tiles, id)?;
                    let top = row_start(TILE_HEIGHT - 1);
                    match (hash_at(&bytes, top), hash_at(&bytes, top + 1)) {
                        (Some(l), Some(r)) => Ok(node_hash(&l, &r)),
                        _ => Err(AuditError::Corrupt(format!("Merkle tile {}/{i}", tier - 1))),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            tiers.push(PartialTile::from_lowest_row(
                TileId { tier, index },
                &lowest,
            ));
            tier += 1;
        }
        Ok(Edge { size, tiers })
    }

    /// Records the nodes one append completed (bottom-up, as
    /// [`super::merkle::nodes_completed_by_append`] returns them), and the size
    /// grows by one. Tiles they fill are pushed to `full`, to be stored.
    pub(crate) fn push(
        &mut self,
        nodes: &[(u8, u64, Hash)],
        full: &mut Vec<(TileId, Vec<u8>)>,
    ) -> Result<(), AuditError> {
        for &(level, index, hash) in nodes {
            let place = Place::of(level, index);
            let tier = usize::from(place.tile.tier);
            if tier == self.tiers.len() {
                self.tiers.push(PartialTile::empty(TileId {
                    tier: place.tile.tier,
                    index: 0,
                }));
            }
            let out_of_order = || {
                AuditError::Corrupt(format!(
                    "Merkle node {level}/{index} completed out of order"
                ))
            };
            let tile = self.tiers.get_mut(tier).ok_or_else(out_of_order)?;
            // Nodes complete left to right, each row after the one below it.
            let expected = if place.row == 0 {
                tile.filled
            } else {
                (tile.filled >> place.row).wrapping_sub(1)
            };
            if tile.id != place.tile || place.slot != expected {
                return Err(out_of_order());
            }
            tile.hashes[place.position()] = hash;
            if place.row == 0 {
                tile.filled += 1;
            }
            if place.row == TILE_HEIGHT - 1 && place.slot == 1 {
                full.push((tile.id, tile.bytes()));
                *tile = PartialTile::empty(TileId {
                    tier: tile.id.tier,
                    index: tile.id.index + 1,
                });
            }
        }
        self.size += 1;
        Ok(())
    }

    /// The node, if it is complete and in one of the edge's partial tiles.
    fn partial_node(&self, place: &Place) -> Option<Hash> {
        let tile = self.tiers.get(usize::from(place.tile.tier))?;
        if tile.id == place.tile && place.complete_in(tile.filled) {
            Some(tile.hashes[place.position()])
        } else {
            None
        }
    }

    /// Whether the tile is full (so stored) at the edge's size.
    fn is_full(&self, tile: TileId) -> bool {
        self.tiers
            .get(usize::from(tile.tier))
            .is_some_and(|t| tile.index < t.id.index)
    }
}

/// The writer reads left siblings, and checkpoints their root, from the edge
/// alone (see the module documentation).
impl NodeSource for Edge {
    type Error = AuditError;

    fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
        self.partial_node(&Place::of(level, index))
            .ok_or_else(|| missing(level, index))
    }
}

/// Where full tiles are stored.
pub(crate) trait FullTiles {
    /// The tile's bytes, or `None` if it is not stored.
    fn full_tile(&self, id: TileId) -> Result<Option<sled::IVec>, AuditError>;
}

/// The unit tests below keep tiles in a sled tree, as logs written before
/// [`TileFiles`] did ([`TileFiles::adopt`] moves those out when opened).
#[cfg(test)]
impl FullTiles for sled::Tree {
    fn full_tile(&self, id: TileId) -> Result<Option<sled::IVec>, AuditError> {
        Ok(self.get(tile_key(id))?)
    }
}

/// Reads a stored tile, checking its length.
pub(crate) fn read_full_tile(
    tiles: &(impl FullTiles + ?Sized),
    id: TileId,
) -> Result<sled::IVec, AuditError> {
    match tiles.full_tile(id)? {
        Some(bytes) if bytes.len() == TILE_BYTES => Ok(bytes),
        Some(_) => Err(AuditError::Corrupt(format!(
            "Merkle tile {}/{} is malformed",
            id.tier, id.index
        ))),
        None => Err(AuditError::Corrupt(format!(
            "Merkle tile {}/{} is missing",
            id.tier, id.index
        ))),
    }
}

/// Full tiles in flat files beside the sled database, one per tier (`tiles-<T>`),
/// tile `i` at byte `i × TILE_BYTES`. A proof reads its tiles with `pread`, from the
/// operating system's page cache rather than from sled's cache in the process: at
/// 10^6 entries the bottom tier alone is 60 MB, which sled's cache could not hold
/// within the memory budget, so proofs there paid a sled page-in each.
///
/// The writer writes a commit's completed tiles after its write-ahead record is
/// durable, and syncs the files with sled before the write-ahead file starts over
/// ([`super::wal`]); a crash loses only writes that the replay makes again. A slot
/// past the end of its file, or all zeros, is a tile not stored.
pub(crate) struct TileFiles {
    dir: std::path::PathBuf,
    files: std::sync::RwLock<Vec<Option<Arc<std::fs::File>>>>,
}

/// The file name of a tier's tiles.
pub(crate) fn tile_file_name(tier: u8) -> String {
    format!("tiles-{tier:02}")
}

impl TileFiles {
    pub(crate) fn open(dir: &std::path::Path) -> TileFiles {
        TileFiles {
            dir: dir.to_owned(),
            files: Default::default(),
        }
    }

    fn io(what: &str, tier: u8, e: std::io::Error) -> AuditError {
        AuditError::Unavailable(format!("Merkle tile file of tier {tier}: {what}: {e}"))
    }

    /// The tier's file, opened once; `None` if it does not exist and `create` is false.
    fn file(&self, tier: u8, create: bool) -> Result<Option<Arc<std::fs::File>>, AuditError> {
        let t = usize::from(tier);
        if let Some(Some(f)) = self.files.read().unwrap_or_else(|p| p.into_inner()).get(t) {
            return Ok(Some(f.clone()));
        }
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(f)) = files.get(t) {
            return Ok(Some(f.clone()));
        }
        let path = self.dir.join(tile_file_name(tier));
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path);
        let file = match opened {
            Ok(f) => {
                if create {
                    // A new file's name must survive a power cut too.
                    std::fs::File::open(&self.dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| Self::io("sync its folder", tier, e))?;
                }
                Arc::new(f)
            }
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io("open", tier, e)),
        };
        if files.len() <= t {
            files.resize(t + 1, None);
        }
        files[t] = Some(file.clone());
        Ok(Some(file))
    }

    /// Stores a full tile (not synced: see the type's notes).
    pub(crate) fn write(&self, id: TileId, bytes: &[u8]) -> Result<(), AuditError> {
        use std::os::unix::fs::FileExt;
        if bytes.len() != TILE_BYTES {
            return Err(AuditError::Corrupt(format!(
                "Merkle tile {}/{} is malformed",
                id.tier, id.index
            )));
        }
        let file = self.file(id.tier, true)?.expect("created");
        file.write_all_at(bytes, id.index * TILE_BYTES as u64)
            .map_err(|e| Self::io("write", id.tier, e))
    }

    /// Makes every tile written so far durable.
    pub(crate) fn sync(&self) -> Result<(), AuditError> {
        let files: Vec<_> = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .filter_map(|(tier, f)| Some((tier as u8, f.clone()?)))
            .collect();
        for (tier, f) in files {
            f.sync_data().map_err(|e| Self::io("fdatasync", tier, e))?;
        }
        Ok(())
    }

    /// The bytes of the tier's file (0 if there is none).
    pub(crate) fn stored_bytes(&self, tier: u8) -> Result<u64, AuditError> {
        match self.file(tier, false)? {
            Some(f) => Ok(f.metadata().map_err(|e| Self::io("stat", tier, e))?.len()),
            None => Ok(0),
        }
    }

    /// Moves tiles that a log written before these files kept in its sled tree into
    /// them: written and synced here, then removed from the tree. Returns how many.
    pub(crate) fn adopt(&self, tree: &sled::Tree) -> Result<usize, AuditError> {
        let mut keys = Vec::new();
        for item in tree.scan_prefix([NODE]) {
            let (key, bytes) = item?;
            let id = tile_id_of_key(&key)
                .ok_or_else(|| AuditError::Corrupt("a Merkle tile key is malformed".into()))?;
            self.write(id, &bytes)?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Ok(0);
        }
        self.sync()?;
        for key in &keys {
            tree.remove(key)?;
        }
        Ok(keys.len())
    }
}

impl FullTiles for TileFiles {
    fn full_tile(&self, id: TileId) -> Result<Option<sled::IVec>, AuditError> {
        use std::os::unix::fs::FileExt;
        let Some(file) = self.file(id.tier, false)? else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; TILE_BYTES];
        match file.read_exact_at(&mut bytes, id.index * TILE_BYTES as u64) {
            Ok(()) if bytes.iter().all(|b| *b == 0) => Ok(None),
            Ok(()) => Ok(Some(bytes.into())),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(Self::io("read", id.tier, e)),
        }
    }
}

/// The tile a stored key names (the inverse of [`tile_key`]).
pub(crate) fn tile_id_of_key(key: &[u8]) -> Option<TileId> {
    let key: &[u8; 10] = key.try_into().ok()?;
    (key[0] == NODE).then(|| TileId {
        tier: key[1],
        index: u64::from_be_bytes(key[2..].try_into().expect("8 bytes")),
    })
}

/// Full tiles of tier 1 and above, kept in memory: there is about one per 240
/// entries (960 bytes each, so 4 MiB at 10^6 entries), and every proof visits
/// one per tier. The writer adds each as it completes it, and opening the log
/// reads them back from their files ([`TileCache::warm`]), so the first proofs
/// after a restart cost what later ones do. Tier 0 (one tile per 16 entries, 60
/// bytes per entry) is left to the operating system's page cache, through
/// [`TileFiles`].
///
/// Each tier is one array indexed by tile, so a proof's read is one copy of the
/// hash it needs, not a map probe and a shared count on a line another core
/// last wrote. Bounded: tier `t` keeps its first [`TileCache::TIER_1_TILES`]
/// `/ 16^(t-1)` tiles (about 16 MiB in all; every tier of a log of up to 4
/// million entries); proofs read the rest from the files.
#[derive(Debug, Default)]
pub(crate) struct TileCache {
    tiers: RwLock<Vec<CachedTier>>,
}

/// The kept tiles of one tier: tile `i` at `bytes[i × TILE_BYTES..]` when
/// `kept[i]`.
#[derive(Debug, Default)]
struct CachedTier {
    bytes: Vec<u8>,
    kept: Vec<bool>,
}

impl CachedTier {
    fn tile(&self, index: usize) -> Option<&[u8]> {
        if !*self.kept.get(index)? {
            return None;
        }
        self.bytes.get(index * TILE_BYTES..(index + 1) * TILE_BYTES)
    }

    fn keep(&mut self, index: usize, tile: &[u8]) {
        if self.kept.len() <= index {
            self.kept.resize(index + 1, false);
            self.bytes.resize((index + 1) * TILE_BYTES, 0);
        }
        self.bytes[index * TILE_BYTES..(index + 1) * TILE_BYTES].copy_from_slice(tile);
        self.kept[index] = true;
    }
}

impl TileCache {
    /// 15 MiB of tier 1; a sixteenth of that for each tier above.
    const TIER_1_TILES: usize = (15 << 20) / TILE_BYTES;

    /// How many tiles of `tier` (at least 1) it keeps.
    fn room(tier: u8) -> usize {
        let shift = u32::from(TILE_HEIGHT) * u32::from(tier.saturating_sub(1));
        Self::TIER_1_TILES.checked_shr(shift).unwrap_or(0).max(1)
    }

    /// Where tile `id` goes, if it is one the cache keeps.
    fn slot(id: TileId) -> Option<(usize, usize)> {
        let index = usize::try_from(id.index).ok()?;
        (id.tier > 0 && index < Self::room(id.tier)).then(|| (usize::from(id.tier) - 1, index))
    }

    /// The node at `position` of a kept tile.
    pub(crate) fn hash(&self, id: TileId, position: usize) -> Option<Hash> {
        let (tier, index) = Self::slot(id)?;
        let tiers = self.tiers.read().ok()?;
        hash_at(tiers.get(tier)?.tile(index)?, position)
    }

    /// A copy of a kept tile.
    #[cfg(test)]
    pub(crate) fn get(&self, id: TileId) -> Option<Vec<u8>> {
        let (tier, index) = Self::slot(id)?;
        let tiers = self.tiers.read().ok()?;
        Some(tiers.get(tier)?.tile(index)?.to_vec())
    }

    /// Keeps a full tile, if its tier has room for it (the writer adds each as
    /// it completes it).
    pub(crate) fn insert(&self, id: TileId, tile: &[u8]) {
        let Some((tier, index)) = Self::slot(id) else {
            return;
        };
        if tile.len() != TILE_BYTES {
            return;
        }
        if let Ok(mut tiers) = self.tiers.write() {
            Self::tier_mut(&mut tiers, tier).keep(index, tile);
        }
    }

    fn tier_mut(tiers: &mut Vec<CachedTier>, slot: usize) -> &mut CachedTier {
        if tiers.len() <= slot {
            tiers.resize_with(slot + 1, CachedTier::default);
        }
        &mut tiers[slot]
    }

    /// Reads the full tiles of tier 1 and above of a tree of `size` leaves from
    /// their files, as many of each tier as it keeps: one sequential read per
    /// tier.
    pub(crate) fn warm(&self, files: &TileFiles, size: u64) -> Result<(), AuditError> {
        let full = |tier: u8| size >> (u32::from(TILE_HEIGHT) * (u32::from(tier) + 1));
        let mut tiers = self.tiers.write().unwrap_or_else(|p| p.into_inner());
        for tier in (1u8..).take_while(|t| full(*t) > 0) {
            let count = usize::try_from(full(tier))
                .unwrap_or(usize::MAX)
                .min(Self::room(tier));
            let Some(file) = files.file(tier, false)? else {
                continue;
            };
            // A file shorter than the edge says is a damaged log; proofs then
            // read (and report) the missing tiles themselves.
            let stored = file
                .metadata()
                .map_err(|e| TileFiles::io("stat", tier, e))?
                .len();
            let count = count.min(usize::try_from(stored).unwrap_or(usize::MAX) / TILE_BYTES);
            let mut bytes = vec![0u8; count * TILE_BYTES];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, 0)
                .map_err(|e| TileFiles::io("read", tier, e))?;
            let kept = bytes
                .chunks_exact(TILE_BYTES)
                .map(|tile| tile.iter().any(|b| *b != 0))
                .collect();
            *Self::tier_mut(&mut tiers, usize::from(tier) - 1) = CachedTier { bytes, kept };
        }
        Ok(())
    }
}

/// Node reads for one proof (or root): the edge for partial tiles, then the
/// tiles this proof has already read, then the cache, then sled. A proof reads
/// each tile it needs once.
pub(crate) struct ProofNodes<'a> {
    tiles: &'a dyn FullTiles,
    edge: &'a Edge,
    cache: &'a TileCache,
    read: RefCell<Vec<(TileId, sled::IVec)>>,
}

impl<'a> ProofNodes<'a> {
    pub(crate) fn new(tiles: &'a dyn FullTiles, edge: &'a Edge, cache: &'a TileCache) -> Self {
        ProofNodes {
            tiles,
            edge,
            cache,
            read: RefCell::new(Vec::with_capacity(8)),
        }
    }

    fn tile(&self, id: TileId) -> Result<sled::IVec, AuditError> {
        if let Some((_, bytes)) = self.read.borrow().iter().find(|(t, _)| *t == id) {
            return Ok(bytes.clone());
        }
        let bytes = read_full_tile(self.tiles, id)?;
        self.cache.insert(id, &bytes);
        self.read.borrow_mut().push((id, bytes.clone()));
        Ok(bytes)
    }
}

impl NodeSource for ProofNodes<'_> {
    type Error = AuditError;

    fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
        let place = Place::of(level, index);
        if let Some(hash) = self.edge.partial_node(&place) {
            return Ok(hash);
        }
        if !self.edge.is_full(place.tile) {
            return Err(missing(level, index));
        }
        if let Some(hash) = self.cache.hash(place.tile, place.position()) {
            return Ok(hash);
        }
        hash_at(&self.tile(place.tile)?, place.position()).ok_or_else(|| missing(level, index))
    }
}

/// Compares a stored full tile with the nodes of a tree rebuilt from the entries
/// (`sgw audit verify`). Returns the first level and index that differ.
pub(crate) fn first_difference<S: NodeSource>(
    id: TileId,
    bytes: &[u8],
    tree: &S,
) -> Option<(u8, u64)> {
    for row in 0..TILE_HEIGHT {
        let level = id.tier * TILE_HEIGHT + row;
        let width = TILE_WIDTH >> row;
        for slot in 0..width {
            let index = id.index * width + slot;
            let stored = hash_at(bytes, row_start(row) + slot as usize);
            match (stored, tree.node(level, index)) {
                (Some(s), Ok(n)) if super::merkle::hashes_equal(&s, &n) => {}
                _ => return Some((level, index)),
            }
        }
    }
    None
}

/// The full tiles a tree of `size` leaves has, tier by tier.
pub(crate) fn full_tiles(size: u64) -> impl Iterator<Item = TileId> {
    (0u8..)
        .map(move |tier| (tier, size >> (u32::from(TILE_HEIGHT) * u32::from(tier))))
        .take_while(|(_, below)| *below > 0)
        .flat_map(|(tier, below)| (0..below / TILE_WIDTH).map(move |index| TileId { tier, index }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::{self, leaf_hash, MemoryTree};

    fn leaf(i: u64) -> Hash {
        leaf_hash(&i.to_be_bytes())
    }

    /// Appends `n` leaves through an edge, storing full tiles in `tree`.
    fn grow(tree: &sled::Tree, edge: &mut Edge, memory: &mut MemoryTree, n: u64) {
        for _ in 0..n {
            let seq = edge.size;
            let nodes = merkle::nodes_completed_by_append(seq, leaf(seq), &*edge).unwrap();
            let mut full = Vec::new();
            edge.push(&nodes, &mut full).unwrap();
            for (id, bytes) in full {
                tree.insert(tile_key(id), bytes).unwrap();
            }
            memory.append(leaf(seq));
        }
    }

    fn temp_tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .temporary(true)
            .open()
            .unwrap();
        let tree = db.open_tree("t").unwrap();
        (dir, tree)
    }

    #[test]
    fn row_layout_fills_a_tile_exactly() {
        assert_eq!(row_start(0), 0);
        assert_eq!(row_start(1), TILE_WIDTH as usize);
        assert_eq!(row_start(TILE_HEIGHT - 1) + 2, TILE_NODES);
        let top = TILE_HEIGHT - 1;
        // The last node of tile 1 of tier 1, and the first of tile 1.
        assert_eq!(
            Place::of(TILE_HEIGHT + top, 3),
            Place {
                tile: TileId { tier: 1, index: 1 },
                row: top,
                slot: 1
            }
        );
        assert_eq!(
            Place::of(TILE_HEIGHT, TILE_WIDTH).tile,
            TileId { tier: 1, index: 1 }
        );
    }

    #[test]
    fn the_edge_alone_gives_the_root_and_proofs_match_a_memory_tree() {
        let (_dir, tree) = temp_tree();
        let (mut edge, mut memory) = (Edge::default(), MemoryTree::new());
        let cache = TileCache::default();
        let checkpoints = [1u64, 2, 63, 64, 65, 127, 128, 4095, 4096, 4097, 4160, 9000];
        for &size in &checkpoints {
            let more = size - edge.size;
            grow(&tree, &mut edge, &mut memory, more);
            assert_eq!(
                merkle::root(size, &edge).unwrap(),
                memory.root(),
                "root at {size}"
            );
            let nodes = ProofNodes::new(&tree, &edge, &cache);
            for &earlier in checkpoints.iter().filter(|&&s| s <= size) {
                assert_eq!(
                    merkle::root(earlier, &nodes).unwrap(),
                    merkle::root(earlier, &memory).unwrap()
                );
                for index in [0, earlier / 2, earlier - 1] {
                    assert_eq!(
                        merkle::inclusion_proof(index, earlier, &nodes).unwrap(),
                        merkle::inclusion_proof(index, earlier, &memory).unwrap(),
                        "inclusion {index} in {earlier} at {size}"
                    );
                }
                assert_eq!(
                    merkle::consistency_proof(earlier, size, &nodes).unwrap(),
                    merkle::consistency_proof(earlier, size, &memory).unwrap()
                );
            }
            // Rebuilt from storage, the edge is the same.
            let last: Vec<Hash> = (size - size % TILE_WIDTH..size).map(leaf).collect();
            assert_eq!(
                Edge::rebuild(size, &last, &tree).unwrap(),
                edge,
                "rebuild at {size}"
            );
        }
        let stored: Vec<TileId> = full_tiles(edge.size).collect();
        assert_eq!(stored.len(), tree.len());
        for id in stored {
            let bytes = tree.get(tile_key(id)).unwrap().unwrap();
            assert_eq!(first_difference(id, &bytes, &memory), None);
        }
    }

    #[test]
    fn the_cache_keeps_upper_tiles_within_each_tiers_room_and_nothing_else() {
        let cache = TileCache::default();
        let tile = |b: u8| vec![b; TILE_BYTES];
        let id = |tier, index| TileId { tier, index };
        cache.insert(id(1, 3), &tile(7));
        assert_eq!(cache.get(id(1, 3)), Some(tile(7)));
        assert_eq!(cache.hash(id(1, 3), TILE_NODES - 1), Some([7; 32]));
        assert_eq!(cache.hash(id(1, 3), TILE_NODES), None);
        // The slots before it hold nothing, not zeros.
        assert_eq!(cache.get(id(1, 0)), None);
        assert_eq!(cache.hash(id(1, 2), 0), None);
        // The bottom tier, a tile past its tier's room, a short tile: not kept.
        cache.insert(id(0, 0), &tile(1));
        assert_eq!(cache.get(id(0, 0)), None);
        let last = TileCache::room(2) as u64;
        cache.insert(id(2, last - 1), &tile(2));
        cache.insert(id(2, last), &tile(3));
        assert_eq!(cache.get(id(2, last - 1)), Some(tile(2)));
        assert_eq!(cache.get(id(2, last)), None);
        cache.insert(id(3, 0), &tile(4)[..TILE_BYTES - 1]);
        assert_eq!(cache.get(id(3, 0)), None);
        // Every tier keeps at least its first tile, and the whole stays near 16 MiB.
        assert_eq!(TileCache::room(40), 1);
        let bytes: usize = (1..=20).map(|t| TileCache::room(t) * TILE_BYTES).sum();
        assert!(bytes <= 17 << 20, "{bytes}");
    }

    #[test]
    fn a_node_beyond_the_edge_is_missing_not_made_up() {
        let (_dir, tree) = temp_tree();
        let (mut edge, mut memory) = (Edge::default(), MemoryTree::new());
        grow(&tree, &mut edge, &mut memory, 100);
        let cache = TileCache::default();
        let nodes = ProofNodes::new(&tree, &edge, &cache);
        assert!(nodes.node(0, 99).is_ok());
        assert!(matches!(nodes.node(0, 100), Err(AuditError::Corrupt(_))));
        assert!(matches!(nodes.node(2, 25), Err(AuditError::Corrupt(_))));
        assert!(matches!(nodes.node(7, 0), Err(AuditError::Corrupt(_))));
    }

    #[test]
    fn a_node_completed_out_of_order_is_refused() {
        let mut edge = Edge::default();
        let mut full = Vec::new();
        assert!(edge.push(&[(0, 1, leaf(1))], &mut full).is_err());
    }
}
