//! What every other part stands on, with no knowledge of an HTTP call: the
//! gateway's one error type and its mapping to answers, the ids it makes up,
//! secrets that never print, credentials cut out of URLs, the byte budget
//! that bounds the memory request bodies may hold, and the lock-free latency
//! histogram, and what the binary is (version and commit).

pub mod body_budget;
pub mod build;
pub mod error;
pub mod families;
pub mod ids;
pub mod latency;
pub mod redact;
pub mod secret;
