//! Where a secret comes from: an environment variable or a file. Profiles'
//! Access secrets, clients' tokens and the Redis URL are all read through
//! [`SecretSource`]; a file is re-read for rotation where its user polls it.

use std::path::{Path, PathBuf};

use super::error::{ConfigError, Env};
use crate::base::secret::Secret;

/// An environment variable, or a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    /// The source named by a `{prefix}_env` / `{prefix}_file` pair of keys,
    /// if either is set; both set is an error naming `{prefix}_file`.
    pub fn from_keys(
        var: Option<&str>,
        file: Option<&Path>,
        prefix: &str,
    ) -> Result<Option<SecretSource>, ConfigError> {
        match (var, file) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                format!("{prefix}_file"),
                format_args!("set either {0}_env or {0}_file, not both", leaf(prefix)),
            )),
            (Some(var), None) => Ok(Some(SecretSource::Env(var.to_owned()))),
            (None, Some(file)) => Ok(Some(SecretSource::File(file.to_owned()))),
            (None, None) => Ok(None),
        }
    }

    /// The key this source was given by: `{prefix}_env` or `{prefix}_file`.
    pub fn key(&self, prefix: &str) -> String {
        match self {
            SecretSource::Env(_) => format!("{prefix}_env"),
            SecretSource::File(_) => format!("{prefix}_file"),
        }
    }

    /// Reads the value, less trailing whitespace; an unset variable, an
    /// unreadable file or an empty value is an error naming
    /// `{prefix}_env` or `{prefix}_file`, never quoting the value.
    pub fn read(&self, env: Env<'_>, prefix: &str) -> Result<Secret, ConfigError> {
        let fail = |m: &dyn std::fmt::Display| ConfigError::new(self.key(prefix), m);
        match self {
            SecretSource::Env(var) => match env(var) {
                None => Err(fail(&format_args!("environment variable {var} is not set"))),
                Some(v) if v.trim_end().is_empty() => {
                    Err(fail(&format_args!("environment variable {var} is empty")))
                }
                Some(v) => Ok(Secret::new(v.trim_end())),
            },
            SecretSource::File(path) => read_secret_file(path).map_err(|e| fail(&e)),
        }
    }

    /// The file to poll for rotation, when the secret comes from one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            SecretSource::File(path) => Some(path),
            SecretSource::Env(_) => None,
        }
    }
}

/// `profiles[0].secret` → `secret`.
fn leaf(prefix: &str) -> &str {
    prefix.rsplit('.').next().unwrap_or(prefix)
}

/// A secret file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
}

/// Reads a secret file: its content less trailing whitespace, not empty.
pub fn read_secret_file(path: &Path) -> Result<Secret, SecretFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let value = text.trim_end();
    if value.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_variable_or_a_file_and_names_the_key_on_failure() {
        let env = |name: &str| match name {
            "SET" => Some("value-1 \n".to_owned()),
            "BLANK" => Some("  ".to_owned()),
            _ => None,
        };
        let set = SecretSource::Env("SET".into());
        assert_eq!(set.read(&env, "p.secret").unwrap().expose(), "value-1");
        let e = SecretSource::Env("BLANK".into())
            .read(&env, "p.secret")
            .unwrap_err();
        assert_eq!(e.key, "p.secret_env");
        assert!(e.message.contains("empty"), "{e}");
        let e = SecretSource::Env("UNSET".into())
            .read(&env, "p.secret")
            .unwrap_err();
        assert!(e.message.contains("not set"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "from-file\n").unwrap();
        let source = SecretSource::File(file.clone());
        assert_eq!(source.read(&env, "p.secret").unwrap().expose(), "from-file");
        assert_eq!(source.file(), Some(file.as_path()));
        let e = SecretSource::File(dir.path().join("missing"))
            .read(&env, "p.secret")
            .unwrap_err();
        assert_eq!(e.key, "p.secret_file");
    }

    #[test]
    fn one_source_at_most() {
        let e = SecretSource::from_keys(Some("V"), Some(Path::new("/f")), "clients[0].token")
            .unwrap_err();
        assert_eq!(e.key, "clients[0].token_file");
        assert!(e.message.contains("token_env or token_file"), "{e}");
        assert_eq!(
            SecretSource::from_keys(None, None, "x.secret").unwrap(),
            None
        );
    }
}
