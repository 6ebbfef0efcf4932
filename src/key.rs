//! Keys as the domain sees them: their text format, their hash at rest, and the validated types
//! that describe them. Nothing here knows about protobuf or the database.

pub mod format;
pub mod hash;
pub mod hash_threads;
pub mod model;
pub mod names;

pub use format::{Brand, GeneratedKey, KeyId, PresentedKey};
pub use hash::{HashParams, HashPool, HashPoolStats, SecretHasher, UnprovenBudget};
pub use hash_threads::{HashPriority, HashThreads};
pub use model::{Environment, Key, KeyState, Role, StoredKey};
pub use names::{KeyDescription, KeyName, Metadata, Scope, Scopes, WorkspaceId};
