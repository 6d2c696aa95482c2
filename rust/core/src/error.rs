//! The crate's error type. Messages are written for the end user: they say what was
//! wrong and what to change, because the Python layer shows them verbatim.

/// Everything that can go wrong in ferroquant-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed arguments of the wrong shape, size or range.
    #[error("{0}")]
    InvalidArgument(String),
    /// Input data contained NaN or infinity.
    #[error("{0}")]
    NonFinite(String),
    /// The Hessian stayed non positive-definite after every damping step.
    #[error("{0}")]
    NotPositiveDefinite(String),
    /// File-system or serialization failure while writing tensors.
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, Error>;
