//! Storage: key files kept beside (never inside) the sled databases, sealing of
//! everything sensitive at rest, and the sled trees of each capability.

pub mod keys;
pub mod seal;
pub mod sync;

pub use keys::{KeyError, Keys};
pub use seal::{SealError, Sealer};
pub use sync::SyncPoint;
