//! Caller authentication for a shared gateway: `[[clients]]`, each with a
//! bearer token or a name in its TLS client certificate, and the profiles it
//! may use.
//!
//! With any client configured, every proxied call must come from a client:
//! on a connection whose verified client certificate names a client's
//! `cert_san`, or with `Authorization: Bearer <token>`; otherwise 401. Tokens
//! are kept only as SHA-256 digests and compared in constant time against
//! every client (no early exit), and never logged. The caller's
//! `Authorization` header is never forwarded upstream, with or without
//! clients. With no client configured, the gateway refuses to start on a
//! non-loopback listener unless `allow_unauthenticated = true`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

use crate::base::error::GatewayError;
use crate::base::secret::Secret;
use crate::config::{ClientConfig, ConfigError, Env, TokenSource};
use crate::net::tls::PeerIdentity;
use crate::policy::profiles::{Profile, Profiles};

/// A loaded client. `Debug` shows no digest.
#[derive(Clone)]
pub struct Client {
    pub name: Arc<str>,
    /// Its index among the quota's clients (0 is the calls of no client).
    pub quota: usize,
    proof: Proof,
    profiles: Vec<Arc<str>>,
    /// The file its token is read from, re-read for rotation.
    token_file: Option<PathBuf>,
}

/// How a client is recognised.
#[derive(Clone)]
enum Proof {
    /// Its bearer token's SHA-256; replaced when its token file changes.
    Token(Arc<ArcSwap<[u8; 32]>>),
    /// A subject alternative name of its client certificate.
    CertSan(Arc<str>),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("profiles", &self.profiles)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `[[clients]]` entry `c`, the quota's client `quota`.
    pub fn load(
        c: &ClientConfig,
        key: &str,
        quota: usize,
        env: Env<'_>,
    ) -> Result<Client, ConfigError> {
        if c.name.is_empty() {
            return Err(ConfigError::new(format!("{key}.name"), "must not be empty"));
        }
        if c.profiles.is_empty() {
            return Err(ConfigError::new(
                format!("{key}.profiles"),
                "list at least one profile this client may use",
            ));
        }
        let mut token_file = None;
        let proof = match c.token_source(key)? {
            TokenSource::Secret(source) => {
                let token = source.read(env, &format!("{key}.token"))?;
                token_file = source.file().map(Path::to_path_buf);
                Proof::Token(Arc::new(ArcSwap::from_pointee(digest_of(&token))))
            }
            TokenSource::Sha256(hex_digest) => {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(hex_digest, &mut digest).map_err(|_| {
                    ConfigError::new(format!("{key}.token_sha256"), "must be 64 hex characters")
                })?;
                Proof::Token(Arc::new(ArcSwap::from_pointee(digest)))
            }
            TokenSource::CertSan(san) => Proof::CertSan(Arc::from(san.as_str())),
        };
        Ok(Client {
            name: Arc::from(c.name.as_str()),
            quota,
            proof,
            profiles: c.profiles.iter().map(|p| Arc::from(p.as_str())).collect(),
            token_file,
        })
    }

    /// The file this client's token is read from, if it is read from one.
    pub fn token_file(&self) -> Option<&Path> {
        self.token_file.as_deref()
    }

    /// Accepts `token` from now on instead of the one before; true when it
    /// differs from it.
    pub fn rotate(&self, token: &Secret) -> bool {
        let Proof::Token(digest) = &self.proof else {
            return false;
        };
        let new = digest_of(token);
        if **digest.load() == new {
            return false;
        }
        digest.store(Arc::new(new));
        true
    }

    /// The profile this client's call uses: the one it names (which must be
    /// on its list), or its default.
    pub fn select<'a>(
        &self,
        profiles: &'a Profiles,
        requested: Option<&HeaderValue>,
    ) -> Result<&'a Arc<Profile>, GatewayError> {
        let allowed = |name: &str| self.profiles.iter().any(|p| &**p == name);
        let name = match requested {
            Some(r) => {
                let r = r.to_str().map_err(|_| GatewayError::ProfileNotSelectable)?;
                if !allowed(r) {
                    return Err(GatewayError::ProfileNotSelectable);
                }
                r
            }
            None if allowed(&profiles.default_profile().name) => &profiles.default_profile().name,
            None => &self.profiles[0],
        };
        profiles.get(name).ok_or(GatewayError::ProfileNotSelectable)
    }
}

fn digest_of(token: &Secret) -> [u8; 32] {
    Sha256::digest(token.expose().as_bytes()).into()
}

/// All configured clients.
#[derive(Clone, Debug, Default)]
pub struct Clients {
    list: Vec<Client>,
}

impl Clients {
    pub fn new(list: Vec<Client>) -> Clients {
        Clients { list }
    }

    /// Every client, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.list.iter()
    }

    /// `Ok(None)` when no client is configured (no authentication); the
    /// caller's client when its connection's verified certificate (`peer`)
    /// names one's `cert_san`, or else when its bearer token matches one's;
    /// 401 otherwise.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&PeerIdentity>,
    ) -> Result<Option<&Client>, GatewayError> {
        if self.list.is_empty() {
            return Ok(None);
        }
        if let Some(peer) = peer {
            let named = self.list.iter().find(|c| match &c.proof {
                Proof::CertSan(san) => peer.sans.iter().any(|s| s.as_str() == &**san),
                Proof::Token(_) => false,
            });
            if let Some(client) = named {
                return Ok(Some(client));
            }
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(GatewayError::Unauthenticated)?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for client in &self.list {
            // Every client is compared, whatever matched before.
            if let Proof::Token(digest) = &client.proof
                && crate::base::secret::same_digest(&digest.load(), &presented)
            {
                found = Some(client);
            }
        }
        found.map(Some).ok_or(GatewayError::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, token: &str, profiles: &[&str]) -> Client {
        let env = |_: &str| Some(token.to_owned());
        Client::load(
            &ClientConfig {
                name: name.into(),
                token_env: Some("T".into()),
                profiles: profiles.iter().map(|p| p.to_string()).collect(),
                ..ClientConfig::default()
            },
            "clients[0]",
            1,
            &env,
        )
        .unwrap()
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[test]
    fn finds_the_client_whose_token_matches() {
        let clients = Clients::new(vec![
            client("a", "tok-a", &["p"]),
            client("b", "tok-b", &["p"]),
        ]);
        assert_eq!(
            &*clients
                .authenticate(&bearer("tok-b"), None)
                .unwrap()
                .unwrap()
                .name,
            "b"
        );
        assert!(matches!(
            clients.authenticate(&bearer("tok-c"), None),
            Err(GatewayError::Unauthenticated)
        ));
        assert!(matches!(
            clients.authenticate(&HeaderMap::new(), None),
            Err(GatewayError::Unauthenticated)
        ));
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dG9rLWE="),
        );
        assert!(clients.authenticate(&basic, None).is_err());
    }

    #[test]
    fn no_clients_means_no_authentication() {
        assert!(
            Clients::default()
                .authenticate(&HeaderMap::new(), None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn sha256_tokens_and_redacted_debug() {
        // sha256("tok-a"), computed with `printf tok-a | sha256sum`.
        let c = Client::load(
            &ClientConfig {
                name: "a".into(),
                token_sha256: Some(
                    "4f66a4283f8bc9768c3cb97fd06d267b79315aee941c9c1727b9354509242ffe".into(),
                ),
                profiles: vec!["p".into()],
                ..ClientConfig::default()
            },
            "clients[0]",
            1,
            &|_| None,
        );
        let c = c.unwrap();
        assert!(!format!("{c:?}").contains("4f66"));
        let clients = Clients::new(vec![c]);
        assert_eq!(
            &*clients
                .authenticate(&bearer("tok-a"), None)
                .unwrap()
                .unwrap()
                .name,
            "a"
        );
        let bad = Client::load(
            &ClientConfig {
                name: "a".into(),
                token_sha256: Some("xyz".into()),
                profiles: vec!["p".into()],
                ..ClientConfig::default()
            },
            "clients[0]",
            1,
            &|_| None,
        );
        assert_eq!(bad.unwrap_err().key, "clients[0].token_sha256");
    }
}
