//! TUF 1.0 metadata documents and their signed envelopes.
//!
//! A [`Signed`] keeps the `signed` part as the JSON value it arrived as, so signatures are
//! checked over exactly the bytes the signer canonicalised (fields this build does not know
//! included), and parses the typed document only from that value.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, VerifyError};
use crate::keys::{canonical_json, PublicKey, SigningKey};

/// The TUF specification version written into documents this project makes.
pub const SPEC_VERSION: &str = "1.0.31";

/// Upper bound on any metadata document this project decodes (endless-data defence).
pub const MAX_METADATA_BYTES: usize = 4 * 1024 * 1024;

/// One signature in an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Key id of the signing key.
    pub keyid: String,
    /// Hex ed25519 signature over the canonical JSON of `signed`.
    pub sig: String,
}

/// A signed envelope: `{"signed": …, "signatures": […]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// The document, exactly as received.
    pub signed: serde_json::Value,
    /// Its signatures.
    pub signatures: Vec<Signature>,
}

/// A role's keys and threshold, as listed in root (or a delegation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    /// Key ids allowed to sign for the role.
    pub keyids: Vec<String>,
    /// How many distinct keys must sign.
    pub threshold: u32,
}

/// The `root` role: the trust anchor listing every top-level role's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Always `root`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// TUF spec version.
    pub spec_version: String,
    /// Monotonic version.
    pub version: u64,
    /// Expiry, `YYYY-MM-DDTHH:MM:SSZ`.
    pub expires: String,
    /// Whether the repository serves `N.role.json` files.
    #[serde(default)]
    pub consistent_snapshot: bool,
    /// Key id → key.
    pub keys: BTreeMap<String, PublicKey>,
    /// Role name → keys and threshold.
    pub roles: BTreeMap<String, RoleKeys>,
}

/// A file named by snapshot or timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaFile {
    /// Version of the named document.
    pub version: u64,
    /// Its length in bytes, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Its hashes, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<BTreeMap<String, String>>,
}

/// The `snapshot` and `timestamp` roles: versions of other metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaIndex {
    /// `snapshot` or `timestamp`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// TUF spec version.
    pub spec_version: String,
    /// Monotonic version.
    pub version: u64,
    /// Expiry.
    pub expires: String,
    /// File name (`targets.json`, `snapshot.json`) → what it must be.
    pub meta: BTreeMap<String, MetaFile>,
}

/// One target: a file with its length and hashes, and custom data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFile {
    /// Length in bytes.
    pub length: u64,
    /// Algorithm → hex digest.
    pub hashes: BTreeMap<String, String>,
    /// Free-form data; modelcast keeps its manifest under `modelcast`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<serde_json::Value>,
}

/// The delegations of a targets role: the keys it trusts and, either as a list of roles or as
/// succinct hash bins, who may sign for which target paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegations {
    /// Key id → key.
    pub keys: BTreeMap<String, PublicKey>,
    /// Delegated roles, in order of priority (absent when `succinct_roles` is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<DelegatedRole>>,
    /// Succinct hash-bin delegations (TAP 15), instead of `roles`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succinct_roles: Option<SuccinctRoles>,
}

/// One delegated role: its keys, threshold and the target paths it may sign for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegatedRole {
    /// The role's name (its metadata is `<name>.json`).
    pub name: String,
    /// Key ids (from the delegator's `keys`) allowed to sign for the role.
    pub keyids: Vec<String>,
    /// How many distinct keys must sign.
    pub threshold: u32,
    /// Whether a search that reaches this role stops at it instead of backtracking.
    #[serde(default)]
    pub terminating: bool,
    /// Shell-style patterns of target paths (`*` and `?` do not cross `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Hex prefixes of the SHA-256 of target paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hash_prefixes: Option<Vec<String>>,
}

/// Succinct hash-bin delegations: `2^bit_length` roles `<name_prefix>-<bin>` sharing one set
/// of keys, each responsible for the targets whose path hash falls in its bin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccinctRoles {
    /// Key ids allowed to sign for every bin.
    pub keyids: Vec<String>,
    /// How many distinct keys must sign.
    pub threshold: u32,
    /// Number of leading bits of SHA-256(target path) that select a bin (1 to 32).
    pub bit_length: u32,
    /// Bin role names are `<name_prefix>-<bin in lower-case hex, zero-padded>`.
    pub name_prefix: String,
}

impl DelegatedRole {
    /// Whether this role is trusted for `target_path` (by pattern or hash prefix).
    pub fn matches(&self, target_path: &str) -> bool {
        if let Some(patterns) = &self.paths {
            return patterns.iter().any(|p| path_matches(p, target_path));
        }
        if let Some(prefixes) = &self.path_hash_prefixes {
            let digest = crate::sha256_hex(target_path.as_bytes());
            return prefixes.iter().any(|p| digest.starts_with(p.as_str()));
        }
        false
    }
}

impl SuccinctRoles {
    fn width(&self) -> usize {
        let max = if self.bit_length >= 32 {
            u32::MAX
        } else {
            (1u32 << self.bit_length) - 1
        };
        format!("{max:x}").len()
    }

    /// The name of bin number `bin`.
    pub fn role_name(&self, bin: u32) -> String {
        format!("{}-{bin:0w$x}", self.name_prefix, w = self.width())
    }

    /// The bin role responsible for `target_path`, or `None` if `bit_length` is out of range.
    pub fn role_for_target(&self, target_path: &str) -> Option<String> {
        use sha2::Digest;
        if !(1..=32).contains(&self.bit_length) {
            return None;
        }
        let digest = sha2::Sha256::digest(target_path.as_bytes());
        let first = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let bin = u64::from(first) >> (32 - self.bit_length);
        Some(format!("{}-{bin:0w$x}", self.name_prefix, w = self.width()))
    }

    /// Whether `role` is one of the bins.
    pub fn is_delegated_role(&self, role: &str) -> bool {
        if !(1..=32).contains(&self.bit_length) {
            return false;
        }
        let Some(suffix) = role
            .strip_prefix(self.name_prefix.as_str())
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        if suffix.len() != self.width() || !suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        u64::from_str_radix(suffix, 16).is_ok_and(|bin| bin < (1u64 << self.bit_length))
    }
}

impl Delegations {
    /// The delegation for `role`, as a verifier of its keys and threshold.
    pub fn verifier(&self, role: &str) -> Option<RoleVerifier> {
        if let Some(roles) = &self.roles {
            let r = roles.iter().find(|r| r.name == role)?;
            return Some(RoleVerifier::from_keys(
                role,
                &self.keys,
                &r.keyids,
                r.threshold,
            ));
        }
        let succinct = self.succinct_roles.as_ref()?;
        succinct.is_delegated_role(role).then(|| {
            RoleVerifier::from_keys(role, &self.keys, &succinct.keyids, succinct.threshold)
        })
    }

    /// The roles trusted for `target_path`, in order, each with its `terminating` flag.
    pub fn roles_for_target(&self, target_path: &str) -> Vec<(String, bool)> {
        if let Some(roles) = &self.roles {
            return roles
                .iter()
                .filter(|r| r.matches(target_path))
                .map(|r| (r.name.clone(), r.terminating))
                .collect();
        }
        self.succinct_roles
            .as_ref()
            .and_then(|s| s.role_for_target(target_path))
            .map(|name| vec![(name, true)])
            .unwrap_or_default()
    }
}

/// Whether `path` matches the delegation pattern `pattern`: both are split on `/` and must have
/// as many parts; each part matches as a shell pattern (`*`, `?`, `[abc]`, `[!a-z]`),
/// case-sensitively.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    pattern.len() == path.len()
        && pattern.iter().zip(&path).all(|(p, s)| {
            glob_part(
                &p.chars().collect::<Vec<_>>(),
                &s.chars().collect::<Vec<_>>(),
            )
        })
}

/// One `fnmatch` part, iteratively with backtracking on the last `*` (linear memory, no
/// recursion on untrusted patterns).
fn glob_part(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => class(&pattern[p..], text[t]),
            Some(c) if *c == text[t] => Some(1),
            _ => None,
        };
        match step {
            Some(len) => {
                p += if pattern[p] == '[' { len } else { 1 };
                t += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// Matches `c` against the character class at the start of `pattern` (`[...]`); returns the
/// class's length in the pattern on a match. An unterminated `[` matches itself literally.
fn class(pattern: &[char], c: char) -> Option<usize> {
    let mut i = 1;
    let negate = matches!(pattern.get(i), Some('!'));
    if negate {
        i += 1;
    }
    let start = i;
    let mut matched = false;
    while let Some(&ch) = pattern.get(i) {
        if ch == ']' && i > start {
            return (matched != negate).then_some(i + 1);
        }
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|e| *e != ']') {
            let end = pattern[i + 2];
            matched |= ch <= c && c <= end;
            i += 3;
        } else {
            matched |= ch == c;
            i += 1;
        }
    }
    // No closing bracket: `[` is an ordinary character.
    (c == '[').then_some(1)
}

/// The `targets` role: the files (models) the repository vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// Always `targets`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// TUF spec version.
    pub spec_version: String,
    /// Monotonic version.
    pub version: u64,
    /// Expiry.
    pub expires: String,
    /// Target path → file.
    pub targets: BTreeMap<String, TargetFile>,
    /// Delegations, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegations: Option<Delegations>,
}

impl TargetFile {
    /// Checks that `bytes` are this target: same length and every listed hash matches. A
    /// target with no hashes, or with a hash algorithm this build does not know, never
    /// verifies.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<(), VerifyError> {
        if self.hashes.is_empty() {
            return Err(VerifyError::Integrity {
                what: what.into(),
                reason: "no hashes to check".into(),
            });
        }
        verify_length_and_hashes(what, bytes, Some(self.length), Some(&self.hashes))
    }
}

impl MetaFile {
    /// Checks `bytes` against the length and hashes this entry gives, if any.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<(), VerifyError> {
        verify_length_and_hashes(what, bytes, self.length, self.hashes.as_ref())
    }

    /// Whether the entry pins a length or hashes.
    pub fn pins_content(&self) -> bool {
        self.length.is_some() || self.hashes.is_some()
    }
}

/// Checks `bytes` against an expected length and hashes (`sha256`, `sha512`; any other
/// algorithm fails, so an unverifiable file is never accepted).
pub fn verify_length_and_hashes(
    what: &str,
    bytes: &[u8],
    length: Option<u64>,
    hashes: Option<&BTreeMap<String, String>>,
) -> Result<(), VerifyError> {
    use sha2::Digest;
    let fail = |reason: String| VerifyError::Integrity {
        what: what.into(),
        reason,
    };
    if let Some(length) = length {
        if bytes.len() as u64 != length {
            return Err(fail(format!("{} bytes, expected {length}", bytes.len())));
        }
    }
    for (algorithm, expected) in hashes.into_iter().flatten() {
        let found = match algorithm.as_str() {
            "sha256" => hex::encode(sha2::Sha256::digest(bytes)),
            "sha512" => hex::encode(sha2::Sha512::digest(bytes)),
            other => return Err(fail(format!("unsupported hash algorithm {other:?}"))),
        };
        if !found.eq_ignore_ascii_case(expected) {
            return Err(fail(format!("{algorithm} is {found}, expected {expected}")));
        }
    }
    Ok(())
}

/// What every TUF document has in common.
pub trait Document: Serialize + DeserializeOwned {
    /// The document's `_type` field as written.
    fn kind(&self) -> &str;
    /// Its version.
    fn version(&self) -> u64;
    /// Its expiry string.
    fn expires(&self) -> &str;
}

macro_rules! document {
    ($t:ty) => {
        impl Document for $t {
            fn kind(&self) -> &str {
                &self.kind
            }
            fn version(&self) -> u64 {
                self.version
            }
            fn expires(&self) -> &str {
                &self.expires
            }
        }
    };
}
document!(Root);
document!(Targets);
document!(MetaIndex);

impl Root {
    /// A new root document naming one key per top-level role.
    pub fn new(
        version: u64,
        expires: &str,
        root: &PublicKey,
        targets: &PublicKey,
        snapshot: &PublicKey,
        timestamp: &PublicKey,
    ) -> Self {
        let mut keys = BTreeMap::new();
        let mut roles = BTreeMap::new();
        for (role, key) in [
            ("root", root),
            ("targets", targets),
            ("snapshot", snapshot),
            ("timestamp", timestamp),
        ] {
            keys.insert(key.key_id(), key.clone());
            roles.insert(
                role.to_string(),
                RoleKeys {
                    keyids: vec![key.key_id()],
                    threshold: 1,
                },
            );
        }
        Root {
            kind: "root".into(),
            spec_version: SPEC_VERSION.into(),
            version,
            expires: expires.into(),
            consistent_snapshot: false,
            keys,
            roles,
        }
    }

    /// The keys and threshold of `role`, as a verifier.
    pub fn role(&self, role: &str) -> Result<RoleVerifier, VerifyError> {
        let spec = self.roles.get(role).ok_or_else(|| VerifyError::Mismatch {
            role: "root".into(),
            reason: format!("root lists no {role} role"),
        })?;
        Ok(RoleVerifier::from_keys(
            role,
            &self.keys,
            &spec.keyids,
            spec.threshold,
        ))
    }
}

impl Targets {
    /// An empty targets document.
    pub fn new(version: u64, expires: &str) -> Self {
        Targets {
            kind: "targets".into(),
            spec_version: SPEC_VERSION.into(),
            version,
            expires: expires.into(),
            targets: BTreeMap::new(),
            delegations: None,
        }
    }
}

impl MetaIndex {
    /// A snapshot (`kind = "snapshot"`) or timestamp (`kind = "timestamp"`) document.
    pub fn new(kind: &str, version: u64, expires: &str, meta: BTreeMap<String, MetaFile>) -> Self {
        MetaIndex {
            kind: kind.into(),
            spec_version: SPEC_VERSION.into(),
            version,
            expires: expires.into(),
            meta,
        }
    }
}

/// Who may sign for one role, and how many of them must.
#[derive(Debug, Clone)]
pub struct RoleVerifier {
    role: String,
    keys: Vec<(String, PublicKey)>,
    threshold: u32,
}

impl RoleVerifier {
    /// A verifier from explicit keys (the director keys pinned in an agent's config).
    pub fn new(role: &str, keys: Vec<PublicKey>, threshold: u32) -> Self {
        RoleVerifier {
            role: role.into(),
            keys: keys.into_iter().map(|k| (k.key_id(), k)).collect(),
            threshold,
        }
    }

    /// A verifier from a delegator's key map: the keys named by `keyids` (ids as the delegator
    /// writes them; ids it lists without a key are skipped).
    pub fn from_keys(
        role: &str,
        keys: &BTreeMap<String, PublicKey>,
        keyids: &[String],
        threshold: u32,
    ) -> Self {
        RoleVerifier {
            role: role.into(),
            keys: keyids
                .iter()
                .filter_map(|id| keys.get(id).map(|k| (id.clone(), k.clone())))
                .collect(),
            threshold,
        }
    }

    /// The role's name.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Checks that a threshold of distinct authorised keys signed `envelope`.
    pub fn check(&self, envelope: &Signed) -> Result<(), VerifyError> {
        let message = canonical_json(&envelope.signed)?;
        let mut signers: Vec<&str> = Vec::new();
        for sig in &envelope.signatures {
            if signers.contains(&sig.keyid.as_str()) {
                continue;
            }
            let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == sig.keyid) else {
                continue;
            };
            if key.verifies(&message, &sig.sig) {
                signers.push(&sig.keyid);
            }
        }
        if self.threshold == 0 || (signers.len() as u64) < u64::from(self.threshold) {
            return Err(VerifyError::Threshold {
                role: self.role.clone(),
                valid: signers.len(),
                threshold: self.threshold,
            });
        }
        Ok(())
    }
}

impl Signed {
    /// Signs a document with each of `keys`.
    pub fn sign<T: Serialize>(doc: &T, keys: &[&SigningKey]) -> Self {
        let signed = serde_json::to_value(doc).expect("documents serialize");
        let message = canonical_json(&signed).expect("documents carry no floats");
        let signatures = keys
            .iter()
            .map(|k| Signature {
                keyid: k.public().key_id(),
                sig: k.sign_hex(&message),
            })
            .collect();
        Signed { signed, signatures }
    }

    /// Decodes an envelope from untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(DecodeError::Invalid {
                what: "metadata",
                reason: format!("{} bytes exceeds {MAX_METADATA_BYTES}", bytes.len()),
            });
        }
        serde_json::from_slice(bytes).map_err(|e| DecodeError::json("signed metadata", e))
    }

    /// The envelope as JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("json values serialize")
    }

    /// Checks the signatures against `verifier`, then parses the document and checks its
    /// `_type`. Signatures come first: nothing is parsed from an unauthenticated document.
    pub fn verify<T: Document>(
        &self,
        verifier: &RoleVerifier,
        expected_type: &'static str,
    ) -> Result<T, VerifyError> {
        verifier.check(self)?;
        self.parse(expected_type)
    }

    /// Parses the document without checking signatures (for reading one's own trusted copy).
    pub fn parse<T: Document>(&self, expected_type: &'static str) -> Result<T, VerifyError> {
        let doc: T = serde_json::from_value(self.signed.clone())
            .map_err(|e| DecodeError::json(expected_type, e))?;
        if doc.kind() != expected_type {
            return Err(VerifyError::WrongType {
                expected: expected_type,
                found: doc.kind().into(),
            });
        }
        Ok(doc)
    }
}

/// Parses a TUF expiry (`YYYY-MM-DDTHH:MM:SSZ`) into Unix seconds.
pub fn parse_expiry(expires: &str) -> Result<i64, DecodeError> {
    time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| DecodeError::Invalid {
            what: "expires",
            reason: format!("{expires:?}: {e}"),
        })
}

/// Formats Unix seconds as a TUF expiry.
pub fn format_expiry(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&fmt).expect("a valid date formats")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn root_round_trips_and_verifies() {
        let (r, t, s, ts) = (key(1), key(2), key(3), key(4));
        let root = Root::new(
            1,
            "2030-01-01T00:00:00Z",
            &r.public(),
            &t.public(),
            &s.public(),
            &ts.public(),
        );
        let env = Signed::sign(&root, &[&r]);
        let back = Signed::from_slice(&env.to_vec()).unwrap();
        let verifier = root.role("root").unwrap();
        let parsed: Root = back.verify(&verifier, "root").unwrap();
        assert_eq!(parsed, root);
        // Signed by the wrong key: rejected.
        let forged = Signed::sign(&root, &[&t]);
        assert!(matches!(
            forged.verify::<Root>(&verifier, "root"),
            Err(VerifyError::Threshold { .. })
        ));
        // The same signature twice does not reach a threshold of two.
        let mut twice = env.clone();
        twice.signatures.push(twice.signatures[0].clone());
        let v2 = RoleVerifier::new("root", vec![r.public(), t.public()], 2);
        assert!(v2.check(&twice).is_err());
    }

    #[test]
    fn tampered_document_fails() {
        let k = key(9);
        let doc = Targets::new(3, "2030-01-01T00:00:00Z");
        let mut env = Signed::sign(&doc, &[&k]);
        env.signed["version"] = serde_json::json!(4);
        let v = RoleVerifier::new("targets", vec![k.public()], 1);
        assert!(env.verify::<Targets>(&v, "targets").is_err());
    }

    #[test]
    fn expiry_round_trip() {
        let t = parse_expiry("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(format_expiry(t), "2030-01-01T00:00:00Z");
        assert!(parse_expiry("tomorrow").is_err());
    }

    proptest! {
        #[test]
        fn signed_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(env) = Signed::from_slice(&bytes) {
                let _ = env.parse::<Root>("root");
                let _ = env.parse::<Targets>("targets");
                let _ = env.parse::<MetaIndex>("snapshot");
            }
        }

        #[test]
        fn signed_decoder_survives_mutations(pos in 0usize..400, byte in any::<u8>()) {
            let k = key(5);
            let env = Signed::sign(&Targets::new(1, "2030-01-01T00:00:00Z"), &[&k]);
            let mut bytes = env.to_vec();
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(env) = Signed::from_slice(&bytes) {
                let v = RoleVerifier::new("targets", vec![k.public()], 1);
                let _ = env.verify::<Targets>(&v, "targets");
            }
        }
    }
}
