//! Device groups: a label selector such as `site=berlin,hw=jetson` (all must match);
//! `*` or an empty selector selects every device.

use std::collections::BTreeMap;

use thiserror::Error;

/// A selector that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad group selector {0:?}: expected key=value[,key=value…] or *")]
pub struct SelectorError(pub String);

/// A parsed label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<(String, String)>,
}

impl Selector {
    /// Parses `k=v,k=v` or `*`.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let text = text.trim();
        if text.is_empty() || text == "*" {
            return Ok(Selector { terms: vec![] });
        }
        let terms = text
            .split(',')
            .map(|term| {
                let (k, v) = term
                    .split_once('=')
                    .ok_or_else(|| SelectorError(text.into()))?;
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    return Err(SelectorError(text.into()));
                }
                Ok((k.to_string(), v.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Selector { terms })
    }

    /// Whether a device with `labels` is in the group.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_by_labels() {
        let labels = BTreeMap::from([
            ("site".to_string(), "berlin".to_string()),
            ("hw".to_string(), "jetson".to_string()),
        ]);
        assert!(Selector::parse("site=berlin").unwrap().matches(&labels));
        assert!(Selector::parse("site=berlin, hw=jetson")
            .unwrap()
            .matches(&labels));
        assert!(!Selector::parse("site=paris").unwrap().matches(&labels));
        assert!(Selector::parse("*").unwrap().matches(&labels));
        assert!(Selector::parse("site").is_err());
        assert!(Selector::parse("=x").is_err());
    }
}
