//! The audit log: every publish, upload, deployment, root rotation, rollout start, operator
//! action on a rollout and rollout end, with who and when. Append-only: the API has no way to
//! change or remove an entry, and each entry carries the SHA-256 of the one before it, so an
//! edit of the store shows as a broken chain (`modelcast audit --verify`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// Unix seconds.
    pub at: i64,
    /// Who: a token's name, or the name a request gave when the API is open, or
    /// `rollout N` for what a rollout decided.
    pub who: String,
    /// What: `publish`, `upload`, `deploy`, `root.rotate`, `rollout.start`,
    /// `rollout.pause`, `rollout.resume`, `rollout.abort`, `rollout.cancel`, `rollout.end`.
    pub action: String,
    /// The particulars (model, version, group, reason, …).
    pub details: serde_json::Value,
    /// Hex SHA-256 of the previous entry ([`AuditEntry::digest`]); empty for the first.
    pub prev: String,
}

impl AuditEntry {
    /// The entry that follows `head` (the last entry's position and digest; `None` when the
    /// log is empty).
    pub fn following(
        head: Option<(u64, String)>,
        who: &str,
        action: &str,
        details: &serde_json::Value,
        at: i64,
    ) -> AuditEntry {
        let (seq, prev) = head.map_or((1, String::new()), |(s, d)| (s + 1, d));
        AuditEntry {
            seq,
            at,
            who: who.into(),
            action: action.into(),
            details: details.clone(),
            prev,
        }
    }

    /// Hex SHA-256 of this entry's JSON.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(
            serde_json::to_vec(self).expect("entries serialize"),
        ))
    }
}

/// Checks that `entries` (a whole log, oldest first) link up: consecutive positions, each
/// naming its predecessor's digest. Returns the position where the chain breaks.
pub fn verify_chain(entries: &[AuditEntry]) -> Result<(), String> {
    let mut prev = String::new();
    for (i, e) in entries.iter().enumerate() {
        if e.seq != i as u64 + 1 {
            return Err(format!("entry {} found at position {}", e.seq, i + 1));
        }
        if e.prev != prev {
            return Err(format!("entry {} does not follow entry {}", e.seq, i));
        }
        prev = e.digest();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        for seq in 1..=n {
            let prev = out.last().map(AuditEntry::digest).unwrap_or_default();
            out.push(AuditEntry {
                seq,
                at: 1_700_000_000 + seq as i64,
                who: "alice".into(),
                action: "deploy".into(),
                details: serde_json::json!({ "version": seq }),
                prev,
            });
        }
        out
    }

    #[test]
    fn an_edited_or_missing_entry_breaks_the_chain() {
        let entries = log(5);
        assert_eq!(verify_chain(&entries), Ok(()));
        let mut edited = entries.clone();
        edited[2].who = "mallory".into();
        assert!(verify_chain(&edited).unwrap_err().contains("entry 4"));
        let mut gap = entries.clone();
        gap.remove(1);
        assert!(verify_chain(&gap).is_err());
    }
}
