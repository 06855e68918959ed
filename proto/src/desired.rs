//! The per-device desired state: what the fleet wants a device to run.
//!
//! Published retained on `<p>/d/{device}/desired`. It carries the operators' repository
//! metadata (TUF root rotations, timestamp, snapshot, targets) and the director's targets
//! document for this device, signed by the server's director key, as Uptane does. The agent
//! activates a model only when both agree (see [`crate::verify`]).

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::metadata::{Signed, MAX_METADATA_BYTES};

/// The repository metadata a device needs to check the operators' targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepositoryMetadata {
    /// Root documents newer than any a device may trust, oldest first (rotation chain).
    #[serde(default)]
    pub root: Vec<Signed>,
    /// Signed timestamp.
    pub timestamp: Signed,
    /// Signed snapshot.
    pub snapshot: Signed,
    /// Signed targets (offline operator key).
    pub targets: Signed,
}

/// The desired-state message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Payload format version.
    pub format: u32,
    /// The device this is for.
    pub device: String,
    /// The director's targets for this device; each target's `custom.device` names it, and
    /// the document's version is the device's desired-state counter.
    pub director: Signed,
    /// The operators' repository metadata.
    pub repository: RepositoryMetadata,
}

impl DesiredState {
    /// Decodes untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > 4 * MAX_METADATA_BYTES {
            return Err(DecodeError::Invalid {
                what: "desired state",
                reason: format!("{} bytes is too large", bytes.len()),
            });
        }
        let state: DesiredState =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::json("desired state", e))?;
        if state.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "desired state",
                found: state.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        Ok(state)
    }

    /// Encodes to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("json values serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = DesiredState::from_slice(&bytes);
        }

        #[test]
        fn decoder_survives_json_shaped_noise(s in r#"\{"format":[0-9],"device":"[a-z]{0,3}","director":\{.{0,20}\},"repository":.{0,30}\}"#) {
            let _ = DesiredState::from_slice(s.as_bytes());
        }
    }
}
