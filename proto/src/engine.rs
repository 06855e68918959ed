//! Inference backends as the fleet speaks of them: which backends a device has and which
//! artifact forms each of them runs ([`Engines`], in its report), and which form of a
//! version the director sends a device under a deployment's pin ([`choose_form`]).
//!
//! A manifest may carry its model in several forms (NNEF for tract, ONNX for ONNX Runtime,
//! see [`crate::manifest::Manifest::forms`]); a device downloads one. The director chooses it
//! and names it in the device's signed target (`custom.form`), so that the server knows which
//! chunks the device is entitled to and the device needs no second opinion.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, ModelFormat};

/// An inference backend of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// tract, on the CPU: every agent has it.
    Tract,
    /// ONNX Runtime (agents built with the `ort` feature and given its library).
    Onnxruntime,
}

impl Backend {
    /// Its name in configuration, reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tract => "tract",
            Backend::Onnxruntime => "onnxruntime",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend name that is not `tract` or `onnxruntime`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {0:?} (tract or onnxruntime)")]
pub struct UnknownBackend(pub String);

impl std::str::FromStr for Backend {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, UnknownBackend> {
        match s {
            "tract" => Ok(Backend::Tract),
            "onnxruntime" => Ok(Backend::Onnxruntime),
            other => Err(UnknownBackend(other.into())),
        }
    }
}

/// What a device can run, as it reports it: the artifact forms it would rather receive under
/// its own configuration, in order, and the forms each of its backends loads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engines {
    /// Forms in the order the device prefers them (its configured backend's first).
    pub prefer: Vec<ModelFormat>,
    /// Each backend the device has, with the forms it loads (its own preference first).
    pub backends: BTreeMap<Backend, Vec<ModelFormat>>,
}

impl Engines {
    /// The forms to send, best first: those of the pinned backend when there is a pin and the
    /// device has that backend, else the device's own preference.
    pub fn preference(&self, pin: Option<Backend>) -> &[ModelFormat] {
        pin.and_then(|b| self.backends.get(&b))
            .map_or(&self.prefer[..], |f| &f[..])
    }
}

/// The form of `manifest` a device with `engines` (from its last report; `None` before it
/// reported) should download under a deployment's `pin`: the first of its preference that
/// the manifest carries; the manifest's own artifact when none is, or when the device has not
/// reported. `None` when the manifest has a single form: there is nothing to choose, and
/// targets stay as they were before forms existed.
pub fn choose_form(
    manifest: &Manifest,
    engines: Option<&Engines>,
    pin: Option<Backend>,
) -> Option<ModelFormat> {
    if manifest.forms.is_empty() {
        return None;
    }
    let has = manifest.formats();
    let chosen = engines
        .and_then(|e| e.preference(pin).iter().find(|f| has.contains(f)))
        .copied();
    Some(chosen.unwrap_or(manifest.model_format))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engines(prefer: &[ModelFormat], ort: bool) -> Engines {
        let mut backends = BTreeMap::from([(Backend::Tract, vec![ModelFormat::Nnef])]);
        if ort {
            backends.insert(Backend::Onnxruntime, vec![ModelFormat::Onnx]);
        }
        Engines {
            prefer: prefer.to_vec(),
            backends,
        }
    }

    #[test]
    fn names_parse_back() {
        for b in [Backend::Tract, Backend::Onnxruntime] {
            assert_eq!(b.name().parse::<Backend>().unwrap(), b);
            assert_eq!(serde_json::to_value(b).unwrap(), b.name());
        }
        assert!("cuda".parse::<Backend>().is_err());
    }

    #[test]
    fn the_director_sends_the_first_form_the_device_prefers_that_the_version_has() {
        use ModelFormat::*;
        let mut m = crate::verify::fixture::manifest("m", 1, b"nnef bytes", 4);
        m.model_format = Nnef;
        let auto = engines(&[Onnx, Nnef], true);
        assert_eq!(
            choose_form(&m, Some(&auto), None),
            None,
            "one form: no choice"
        );
        m.forms
            .push(crate::manifest::ArtifactForm::of(Onnx, b"onnx", 4, vec![]));
        assert_eq!(choose_form(&m, Some(&auto), None), Some(Onnx));
        assert_eq!(
            choose_form(&m, Some(&auto), Some(Backend::Tract)),
            Some(Nnef)
        );
        assert_eq!(choose_form(&m, None, None), Some(Nnef), "not reported yet");
        let tract = engines(&[Nnef], false);
        assert_eq!(
            choose_form(&m, Some(&tract), Some(Backend::Onnxruntime)),
            Some(Nnef)
        );
        let neither = engines(&[], false);
        assert_eq!(choose_form(&m, Some(&neither), None), Some(Nnef));
    }

    #[test]
    fn a_pin_picks_its_backends_forms_and_falls_back_to_the_devices_own() {
        use ModelFormat::*;
        let auto = engines(&[Onnx, Nnef], true);
        assert_eq!(auto.preference(None), [Onnx, Nnef]);
        assert_eq!(auto.preference(Some(Backend::Tract)), [Nnef]);
        assert_eq!(auto.preference(Some(Backend::Onnxruntime)), [Onnx]);
        // A device without ONNX Runtime keeps its own order under that pin.
        let tract = engines(&[Nnef], false);
        assert_eq!(tract.preference(Some(Backend::Onnxruntime)), [Nnef]);
    }
}
