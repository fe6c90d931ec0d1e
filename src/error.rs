//! The library's one error type. Every variant names the file or tensor it is about, so the
//! binary can print it in one line (`{:#}`) without adding context of its own.

use std::path::PathBuf;

/// Errors from reading data, reading or writing checkpoints, and validating configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error on a file. (Its message includes the OS error's, so it is not
    /// also given as a `source`: a chained display would say it twice.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A malformed IDX file (MNIST's format).
    #[error("{}: {reason}", path.display())]
    Idx { path: PathBuf, reason: String },
    /// A data directory lacks a file the command needs.
    #[error("{}: no {what} file (looked for {tried})", dir.display())]
    MissingFile {
        dir: PathBuf,
        what: String,
        tried: String,
    },
    /// A network configuration that cannot be built (e.g. a pool size that does not divide the conv map).
    #[error("invalid network configuration: {0}")]
    Config(String),
    /// A checkpoint file that is not what the model expects.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// A tensor with the wrong shape.
    #[error("tensor {tensor}: expected shape {expected:?}, got {got:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// Training diverged: the loss or a weight stopped being finite.
    #[error(
        "training diverged at epoch {epoch}, step {step}: {what}; try a lower learning rate (--lr)"
    )]
    Diverged {
        epoch: usize,
        step: usize,
        what: String,
    },
    /// Data that does not fit the model (image size, label range).
    #[error("{0}")]
    Data(String),
    /// Another file the tool reads (e.g. a metrics file) that is malformed.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub(crate) fn idx(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Idx {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
