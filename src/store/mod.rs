//! Storage: key files kept beside (never inside) the sled databases, sealing of
//! everything sensitive at rest, and the sled trees of each capability.

pub mod keys;
pub mod seal;

pub use keys::{KeyError, Keys};
pub use seal::{SealError, Sealer};
