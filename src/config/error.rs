use std::fmt;
use std::path::{Path, PathBuf};

/// A config that cannot be used, located as precisely as the input allows.
///
/// Rendered as `file:line:column: problem` so that editors and CI logs can jump to it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(location: Location, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            location,
            message: message.into(),
        }
    }
}

/// Where in a config file a problem is: the file, and the line and column when known.
#[derive(Debug, Clone)]
pub struct Location {
    pub path: PathBuf,
    pub line_column: Option<(usize, usize)>,
}

impl Location {
    /// The location of byte `offset` of `text`, the contents of `path`.
    pub(crate) fn at(path: &Path, text: &str, offset: usize) -> Self {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
        Location {
            path: path.to_path_buf(),
            line_column: Some((line, column)),
        }
    }

    pub(crate) fn file(path: &Path) -> Self {
        Location {
            path: path.to_path_buf(),
            line_column: None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((line, column)) = self.line_column {
            write!(f, ":{line}:{column}")?;
        }
        Ok(())
    }
}
