//! What the binary is: its version and the commit it was built from.

/// The crate's version.
pub const VERSION_NUMBER: &str = env!("CARGO_PKG_VERSION");

/// The commit the binary was built from (short hash), or `unknown`.
pub const COMMIT: &str = env!("PANDAGATE_COMMIT");

/// `--version`: "0.1.0 (commit 0123456789ab)".
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PANDAGATE_COMMIT"),
    ")"
);
