//! Why a NetworkPolicy was refused.

use serde::Serialize;

/// One problem in one object. A policy with any rejection still isolates the pods it selects
/// but allows nothing (fail closed), so the error is visible without opening a hole.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, thiserror::Error)]
#[error("{object}: {field}: {error}")]
pub struct Rejection {
    /// `NetworkPolicy/<namespace>/<name>`.
    pub object: String,
    /// JSON path of the offending field, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    /// What is wrong with it.
    pub error: String,
}

/// A problem found while parsing one field, before the owning object is known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {error}")]
pub(crate) struct FieldError {
    pub field: String,
    pub error: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            error: error.into(),
        }
    }

    pub(crate) fn into_rejection(self, object: &str) -> Rejection {
        Rejection {
            object: object.to_string(),
            field: self.field,
            error: self.error,
        }
    }
}
