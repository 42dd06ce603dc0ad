//! Load errors that name the file, the line and column, the action and the field.

use std::fmt;

/// A step of the path to a config value, used to find its line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A problem found while validating, before it is placed in the file.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub(crate) path: Vec<Seg>,
    pub(crate) context: Option<String>,
    pub(crate) field: Option<String>,
    pub(crate) message: String,
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name as given.
    pub file: String,
    /// Line and column (1-based), where known (TOML files, and JSON syntax errors).
    pub location: Option<(usize, usize)>,
    /// What it belongs to: `action "book_appointment"`, `webhook 1`, `automation "crm-sync"`.
    pub context: Option<String>,
    /// The field: `url`, `cache.ttl_s`, `headers.Authorization`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.location {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": ")?;
        if let Some(c) = &self.context {
            write!(f, "{c}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Everything wrong with a config file (at least one error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The errors, in file order where known.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

impl LoadError {
    pub(crate) fn one(file: &str, location: Option<(usize, usize)>, message: String) -> Self {
        LoadError {
            errors: vec![ConfigError {
                file: file.to_string(),
                location,
                context: None,
                field: None,
                message,
            }],
        }
    }
}
