//! `[signing]`: which recipe signs each attempt.

use serde::{Deserialize, Serialize};

use crate::pandapon::signer::{Recipe, TimestampUnit};

/// How requests are signed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// `concat` (default), `sorted_concat`, `query_secret` or `query_key`.
    pub recipe: Recipe,
    /// Unit of the `timestamp` header: `ms` (default) or `s`.
    pub timestamp_unit: TimestampUnit,
}
