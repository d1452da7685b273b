//! Message levels, with Django's numeric values.

use std::fmt;

/// How important a message is. The numeric values are Django's
/// (`DEBUG = 10` … `ERROR = 40`), and levels are ordered by them.
///
/// ```
/// use async_messages::Level;
/// assert!(Level::Debug < Level::Info);
/// assert_eq!(Level::Success as u8, 25);
/// assert_eq!(Level::Warning.to_string(), "warning");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum Level {
    /// Development detail; hidden unless the store's minimum level is lowered. Value 10.
    Debug = 10,
    /// Something the user may want to know. Value 20. The default level.
    #[default]
    Info = 20,
    /// An action the user asked for has succeeded. Value 25.
    Success = 25,
    /// Something the user should look at. Value 30.
    Warning = 30,
    /// Something failed. Value 40.
    Error = 40,
}

impl Level {
    /// All levels, lowest first.
    pub const ALL: [Level; 5] = [
        Level::Debug,
        Level::Info,
        Level::Success,
        Level::Warning,
        Level::Error,
    ];

    /// The level with Django's numeric `value`, if there is one.
    #[must_use]
    pub fn from_value(value: u8) -> Option<Level> {
        Level::ALL.into_iter().find(|level| *level as u8 == value)
    }

    /// The lower-case name, as used in CSS classes and forms: `"debug"` … `"error"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Success => "success",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Level {
    type Err = crate::Error;

    /// Parses a level name (`"info"`, case-insensitive) or its number (`"20"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        Level::ALL
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(trimmed))
            .or_else(|| trimmed.parse::<u8>().ok().and_then(Level::from_value))
            .ok_or_else(|| crate::Error::UnknownLevel {
                input: s.to_owned(),
            })
    }
}
