//! Credential profiles: which AccessKey signs a call and which `user-id` it carries.
//!
//! A caller picks a profile with `x-pandagate-profile` (only profiles marked
//! `selectable`, or the default one) and may propose a `user-id`; the profile's
//! policy decides what is actually sent. Both decisions are pure functions of
//! the caller's headers.

use std::sync::Arc;

use http::HeaderValue;

use crate::base::error::GatewayError;
use crate::base::secret::SecretCell;
use crate::config::{ConfigError, Env, ProfileConfig, SecretSource};

/// A loaded profile. `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: Arc<str>,
    pub access_key: HeaderValue,
    /// Replaced in place when its file changes.
    pub secret: SecretCell,
    /// Where the secret is re-read from, if it came from a file.
    pub secret_source: SecretSource,
    pub user_id: Option<HeaderValue>,
    pub allowed_user_ids: Option<Vec<HeaderValue>>,
    pub selectable: bool,
    /// Index of this profile's AccessKey among the distinct keys: profiles
    /// sharing a key share its quota.
    pub quota_key: usize,
    /// The provider account this profile signs as: a SHA-256 of its
    /// AccessKey. Shared state (idempotency keys, cached answers) is scoped
    /// by it, so deployments sharing a store never see each other's
    /// entries, and a changed AccessKey never reaches the old ones; the
    /// AccessKey itself is never written to a store.
    pub account: [u8; 32],
}

/// The account id of an AccessKey (see [`Profile::account`]).
pub fn account_of(access_key: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"pandagate account v1\0");
    h.update(access_key);
    h.finalize().into()
}

impl Profile {
    /// Builds a profile from its config entry; `key` names the entry in errors.
    pub fn load(p: &ProfileConfig, key: &str, env: Env<'_>) -> Result<Profile, ConfigError> {
        if p.secret.is_some() {
            return Err(ConfigError::new(
                format!("{key}.secret"),
                "secrets are never read from the TOML: use secret_env or secret_file",
            ));
        }
        let header = |field: &str, value: &str| {
            let mut v = HeaderValue::from_str(value).map_err(|_| {
                ConfigError::new(
                    format!("{key}.{field}"),
                    "must be visible ASCII (it is sent as a header)",
                )
            })?;
            if value.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}.{field}"),
                    "must not be empty",
                ));
            }
            v.set_sensitive(true);
            Ok(v)
        };
        let secret_source = p.secret_source(key)?;
        let access_key = match &p.access_key {
            Some(k) => header("access_key", k)?,
            None => {
                return Err(ConfigError::new(
                    format!("{key}.access_key"),
                    "missing access key (for the default profile: PANDAPON_ACCESS_KEY)",
                ));
            }
        };
        let user_id = p
            .user_id
            .as_deref()
            .map(|u| header("user_id", u))
            .transpose()?;
        let allowed_user_ids = p
            .allowed_user_ids
            .as_ref()
            .map(|list| {
                list.iter()
                    .map(|u| header("allowed_user_ids", u))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(Profile {
            name: Arc::from(p.name.as_str()),
            account: account_of(access_key.as_bytes()),
            access_key,
            secret: SecretCell::new(secret_source.read(env, &format!("{key}.secret"))?),
            secret_source,
            user_id,
            allowed_user_ids,
            selectable: p.selectable,
            quota_key: 0,
        })
    }

    /// The `user-id` to send, given what the caller sent (if anything).
    pub fn user_id(
        &self,
        requested: Option<&HeaderValue>,
    ) -> Result<Option<&HeaderValue>, GatewayError> {
        match (requested, &self.allowed_user_ids) {
            // The configured value, equal to the caller's: it does not hold
            // the caller's read buffer.
            (Some(r), Some(allowed)) => allowed
                .iter()
                .find(|a| a.as_bytes() == r.as_bytes())
                .map(Some)
                .ok_or(GatewayError::UserIdNotAllowed),
            _ => Ok(self.user_id.as_ref()),
        }
    }
}

/// All profiles, with the default one.
#[derive(Debug, Clone)]
pub struct Profiles {
    list: Vec<Arc<Profile>>,
    default: usize,
    /// The distinct AccessKeys, indexed by `Profile::quota_key`.
    quota_keys: Vec<Arc<str>>,
}

impl Profiles {
    /// `default` must name one of `list` (config validation guarantees it).
    pub fn new(mut list: Vec<Profile>, default: &str) -> Profiles {
        let default = list
            .iter()
            .position(|p| &*p.name == default)
            .expect("validated: default profile exists");
        let mut quota_keys: Vec<Arc<str>> = Vec::new();
        for p in &mut list {
            let key = p.access_key.to_str().unwrap_or_default();
            p.quota_key = match quota_keys.iter().position(|k| &**k == key) {
                Some(i) => i,
                None => {
                    quota_keys.push(Arc::from(key));
                    quota_keys.len() - 1
                }
            };
        }
        Profiles {
            list: list.into_iter().map(Arc::new).collect(),
            default,
            quota_keys,
        }
    }

    /// The distinct AccessKeys; a profile's `quota_key` indexes this.
    pub fn quota_keys(&self) -> &[Arc<str>] {
        &self.quota_keys
    }

    pub fn default_profile(&self) -> &Arc<Profile> {
        &self.list[self.default]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.list.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Profile>> {
        self.list.iter().find(|p| &*p.name == name)
    }

    /// The profile for a call carrying `x-pandagate-profile: requested`.
    /// Unknown and non-selectable names get the same answer, so callers
    /// cannot probe which profiles exist.
    pub fn select(&self, requested: Option<&HeaderValue>) -> Result<&Arc<Profile>, GatewayError> {
        let Some(requested) = requested else {
            return Ok(self.default_profile());
        };
        let default = self.default_profile();
        if requested.as_bytes() == default.name.as_bytes() {
            return Ok(default);
        }
        self.list
            .iter()
            .find(|p| p.selectable && p.name.as_bytes() == requested.as_bytes())
            .ok_or(GatewayError::ProfileNotSelectable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str, selectable: bool, allowed: Option<&[&str]>) -> Profile {
        Profile {
            name: name.into(),
            access_key: HeaderValue::from_static("ak"),
            secret: SecretCell::new(crate::base::secret::Secret::new("s")),
            secret_source: SecretSource::Env("TEST_SECRET".into()),
            user_id: Some(HeaderValue::from_static("1000")),
            allowed_user_ids: allowed.map(|l| {
                l.iter()
                    .map(|u| HeaderValue::from_str(u).unwrap())
                    .collect()
            }),
            selectable,
            quota_key: 0,
            account: account_of(b"ak"),
        }
    }

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn selection_follows_selectable_flag() {
        let p = Profiles::new(
            vec![
                profile("main", false, None),
                profile("ops", true, None),
                profile("hidden", false, None),
            ],
            "main",
        );
        assert_eq!(&*p.select(None).unwrap().name, "main");
        assert_eq!(&*p.select(Some(&hv("main"))).unwrap().name, "main");
        assert_eq!(&*p.select(Some(&hv("ops"))).unwrap().name, "ops");
        assert!(matches!(
            p.select(Some(&hv("hidden"))),
            Err(GatewayError::ProfileNotSelectable)
        ));
        assert!(matches!(
            p.select(Some(&hv("nope"))),
            Err(GatewayError::ProfileNotSelectable)
        ));
    }

    #[test]
    fn profiles_sharing_an_access_key_share_a_quota_key() {
        let mut other = profile("other", true, None);
        other.access_key = HeaderValue::from_static("ak-2");
        let p = Profiles::new(
            vec![profile("a", false, None), other, profile("b", true, None)],
            "a",
        );
        assert_eq!(p.quota_keys().len(), 2);
        assert_eq!(p.get("a").unwrap().quota_key, p.get("b").unwrap().quota_key);
        assert_ne!(
            p.get("a").unwrap().quota_key,
            p.get("other").unwrap().quota_key
        );
    }

    #[test]
    fn user_id_without_list_is_replaced() {
        let p = profile("p", false, None);
        assert_eq!(p.user_id(Some(&hv("666"))).unwrap(), Some(&hv("1000")));
        assert_eq!(p.user_id(None).unwrap(), Some(&hv("1000")));
    }

    #[test]
    fn user_id_with_list_must_be_listed() {
        let p = profile("p", false, Some(&["1", "2"]));
        assert_eq!(p.user_id(Some(&hv("2"))).unwrap(), Some(&hv("2")));
        assert!(matches!(
            p.user_id(Some(&hv("3"))),
            Err(GatewayError::UserIdNotAllowed)
        ));
        assert_eq!(p.user_id(None).unwrap(), Some(&hv("1000")));
    }
}
