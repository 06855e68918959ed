//! Who may call the operator API: bearer tokens, each with a name and a role.
//!
//! | role | may |
//! | --- | --- |
//! | `viewer` | read everything (devices, models, rollouts, audit log, dashboard data) |
//! | `deployer` | also upload and publish models, deploy, start and steer rollouts |
//! | `admin` | also rotate the repository's root |
//!
//! Tokens live in a TOML file (`modelcast token create` appends to it) as SHA-256 digests, so
//! the file reveals no token. Without a token file the API is open, which is meant for the
//! embedded loopback setup of the demo and tests only. The caller's name goes into the audit
//! log in place of any name a request body claims.

use std::path::Path;

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read.
    Viewer,
    /// Read, publish, deploy, roll out.
    Deployer,
    /// Everything.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "deployer" => Ok(Role::Deployer),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("role {s:?}: viewer, deployer or admin")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        })
    }
}

/// One token, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it (the audit log's name for the caller).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

/// The token file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Every token.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
}

/// A token file that cannot be used.
#[derive(Debug, Error)]
pub enum TokenError {
    /// Reading or writing it failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A name already has a token.
    #[error("a token named {0:?} exists")]
    Exists(String),
}

/// Who is calling, once the token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name; `None` when the API is open.
    pub name: Option<String>,
    /// Its role.
    pub role: Role,
}

impl Caller {
    /// The name for the audit log: the token's, or what the request says when the API is
    /// open.
    pub fn name_or(&self, claimed: &str) -> String {
        self.name.clone().unwrap_or_else(|| claimed.to_string())
    }
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Tokens {
    /// Reads a token file; a missing file has no tokens.
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        let io = |reason: String| TokenError::Io {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| io(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Tokens::default()),
            Err(e) => Err(io(e.to_string())),
        }
    }

    /// Writes the file (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), TokenError> {
        let io = |reason: String| TokenError::Io {
            path: path.display().to_string(),
            reason,
        };
        let text = toml::to_string(self).map_err(|e| io(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| io(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io(e.to_string()))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| io(e.to_string()))
    }

    /// Adds a new random token for `name`; returns it (shown once, never stored).
    pub fn create(&mut self, name: &str, role: Role) -> Result<String, TokenError> {
        if self.tokens.iter().any(|t| t.name == name) {
            return Err(TokenError::Exists(name.into()));
        }
        let mut raw = [0u8; 32];
        OsRng.fill_bytes(&mut raw);
        let token = format!("mc_{}", hex::encode(raw));
        self.tokens.push(TokenEntry {
            name: name.into(),
            role,
            sha256: digest(&token),
        });
        Ok(token)
    }

    /// The caller holding `token`, if any token matches.
    pub fn check(&self, token: &str) -> Option<Caller> {
        let d = digest(token);
        // Every entry is compared (no early exit on the first byte that differs).
        let mut found = None;
        for t in &self.tokens {
            let same = t
                .sha256
                .bytes()
                .zip(d.bytes())
                .fold(t.sha256.len() ^ d.len(), |acc, (a, b)| {
                    acc | usize::from(a ^ b)
                });
            if same == 0 {
                found = Some(Caller {
                    name: Some(t.name.clone()),
                    role: t.role,
                });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_checked_with_their_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let mut tokens = Tokens::load(&path).unwrap();
        let alice = tokens.create("alice", Role::Deployer).unwrap();
        let bob = tokens.create("bob", Role::Viewer).unwrap();
        assert!(tokens.create("alice", Role::Admin).is_err());
        tokens.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&alice) && !text.contains(&bob), "{text}");
        let tokens = Tokens::load(&path).unwrap();
        let caller = tokens.check(&alice).unwrap();
        assert_eq!(
            (caller.name.as_deref(), caller.role),
            (Some("alice"), Role::Deployer)
        );
        assert_eq!(tokens.check(&bob).unwrap().role, Role::Viewer);
        assert_eq!(tokens.check("mc_guess"), None);
        assert_eq!(tokens.check(""), None);
        assert!(Role::Admin > Role::Deployer && Role::Deployer > Role::Viewer);
    }
}
