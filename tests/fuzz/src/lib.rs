//! What the fuzz targets share: a fixed, valid trust anchor (the fixture's deterministic keys)
//! so that decoded documents reach the verifier's checks, not only the JSON parser.

use std::sync::OnceLock;

use modelcast_proto::metadata::{RoleVerifier, Signed};
use modelcast_proto::verify::fixture::Keys;
use modelcast_proto::verify::TrustState;

/// Unix seconds the targets verify at (2027-01-15, before the fixture's expiries).
pub const NOW: i64 = 1_800_000_000;

/// Expiry of every fixture document.
pub const EXPIRES: &str = "2035-01-01T00:00:00Z";

/// The device the desired-state target is addressed to.
pub const DEVICE: &str = "edge-1";

/// The fixture's keys (seed 7).
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::from_seed(7))
}

/// The fixture's version-1 root, signed.
pub fn root() -> &'static Signed {
    static ROOT: OnceLock<Signed> = OnceLock::new();
    ROOT.get_or_init(|| keys().root(EXPIRES))
}

/// A device's trust state after provisioning with [`root`].
pub fn trust() -> TrustState {
    TrustState::from_root(root().clone()).expect("fixture root")
}

/// The director key a device pins.
pub fn director() -> &'static RoleVerifier {
    static DIRECTOR: OnceLock<RoleVerifier> = OnceLock::new();
    DIRECTOR.get_or_init(|| keys().director_verifier())
}
