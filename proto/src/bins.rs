//! How the repository lays out its targets so that metadata stays small: the top-level
//! `targets` role lists no models itself but delegates every target path to one of
//! `2^bit_length` hash bins (TUF's succinct hash-bin delegations, TAP 15), each a targets role
//! of its own signed by the same operator keys. Publishing a version re-signs one bin; a
//! device downloads the top-level targets, the snapshot and only the bins that hold the models
//! it runs, whatever the repository's history.
//!
//! A repository made before bins keeps its top-level targets readable: search
//! ([`crate::trusted::TargetSearch`]) looks there first, then in the bin.

use crate::metadata::{Delegations, SuccinctRoles, Targets};

/// Name prefix of the bin roles (`bins-00` … `bins-ff`).
pub const BIN_PREFIX: &str = "bins";
/// Bits of a target path's SHA-256 that choose its bin: 256 bins. With 1,000 versions
/// published, a bin holds about four.
pub const DEFAULT_BIT_LENGTH: u32 = 8;
/// Most bins a repository may use (2^10): the snapshot lists every bin that exists.
pub const MAX_BIT_LENGTH: u32 = 10;

/// The hash-bin delegation to `keyids` (whose keys are `keys`), `threshold` of them, over
/// `2^bit_length` bins.
pub fn delegation(
    keys: std::collections::BTreeMap<String, crate::keys::PublicKey>,
    threshold: u32,
    bit_length: u32,
) -> Delegations {
    Delegations {
        succinct_roles: Some(SuccinctRoles {
            keyids: keys.keys().cloned().collect(),
            threshold,
            bit_length,
            name_prefix: BIN_PREFIX.into(),
        }),
        keys,
        roles: None,
    }
}

/// The bin that `targets` (top-level) delegates `path` to, if it uses hash bins.
pub fn bin_for(targets: &Targets, path: &str) -> Option<String> {
    targets
        .delegations
        .as_ref()?
        .succinct_roles
        .as_ref()?
        .role_for_target(path)
}

/// Whether `role` is a bin of `targets` (top-level).
pub fn is_bin(targets: &Targets, role: &str) -> bool {
    targets
        .delegations
        .as_ref()
        .and_then(|d| d.succinct_roles.as_ref())
        .is_some_and(|s| s.is_delegated_role(role))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    #[test]
    fn every_path_has_exactly_its_bin() {
        let key = SigningKey::from_bytes(&[3; 32]).public();
        let mut t = Targets::new(1, "2035-01-01T00:00:00Z");
        t.delegations = Some(delegation(
            [(key.key_id(), key)].into(),
            1,
            DEFAULT_BIT_LENGTH,
        ));
        let mut used = std::collections::BTreeSet::new();
        for v in 0..1000 {
            let path = format!("models/m/{v}.nnef.tar");
            let bin = bin_for(&t, &path).unwrap();
            assert!(is_bin(&t, &bin), "{bin}");
            assert_eq!(bin.len(), "bins-00".len());
            used.insert(bin);
        }
        // 1,000 paths spread over most of the 256 bins.
        assert!(used.len() > 200, "{}", used.len());
        assert!(!is_bin(&t, "bins-100"));
        assert!(!is_bin(&t, "targets"));
        assert_eq!(bin_for(&Targets::new(1, ""), "models/m/1.onnx"), None);
    }
}
