//! Delta codec (being written).
use crate::{schema::Layout, snapshot::Snapshot};

/// A second, older baseline that the codec extrapolates from.
#[derive(Clone, Copy, Debug)]
pub struct Prediction<'a> {
    /// The snapshot `span` ticks before the baseline.
    pub prev: &'a Snapshot,
    /// Ticks from `prev` to the baseline (at least 1).
    pub span: u32,
    /// Ticks from the baseline to the target (at least 1).
    pub ahead: u32,
}

/// Why a delta could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// The bytes ended before the delta did.
    #[error("delta truncated")]
    Truncated,
}

/// Encodes the change from `base` to `target`, appending to `out`.
pub fn encode(
    layout: &Layout,
    base: &Snapshot,
    prediction: Option<Prediction<'_>>,
    target: &Snapshot,
    out: &mut Vec<u8>,
) {
    let _ = (layout, base, prediction, target, out);
    todo!()
}

/// Decodes a delta made by [`encode`] with the same baseline and prediction.
pub fn decode(
    layout: &Layout,
    base: &Snapshot,
    prediction: Option<Prediction<'_>>,
    bytes: &[u8],
) -> Result<Snapshot, DeltaError> {
    let _ = (layout, base, prediction, bytes);
    todo!()
}
