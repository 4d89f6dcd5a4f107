//! Storage: key files kept beside (never inside) the sled databases, sealing of
//! everything sensitive at rest, and the sled trees of each capability.

pub mod keys;
pub mod seal;
pub mod sync;

pub use keys::{KeyError, Keys};

/// Whose turn it is to run a chore that must run once per interval across every
/// gateway sharing the storage (the deadline and retention sweepers), not once per
/// gateway.
#[async_trait::async_trait]
pub trait Turns: Send + Sync + 'static {
    /// Whether this gateway should run `chore` now; `every` is how often it runs.
    async fn mine(&self, chore: &'static str, every: std::time::Duration) -> bool;
}

/// One gateway over its own stores: every turn is its own.
pub struct AlwaysMine;

#[async_trait::async_trait]
impl Turns for AlwaysMine {
    async fn mine(&self, _chore: &'static str, _every: std::time::Duration) -> bool {
        true
    }
}
pub use seal::{SealError, Sealer};
pub use sync::SyncPoint;
