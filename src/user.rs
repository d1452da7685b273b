//! Who a message is for.

use std::fmt;

/// The id of the user a message is queued for: an integer (a database
/// primary key) or a string (a user name, an email, a UUID).
///
/// Integer and string ids live in separate spaces: `UserId::from(7)` and
/// `UserId::from("7")` are different users.
///
/// ```
/// use async_messages::UserId;
/// assert_ne!(UserId::from(7u64), UserId::from("7"));
/// assert_eq!(UserId::from("barry"), UserId::from(String::from("barry")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserId {
    /// A numeric id, such as a database primary key.
    Int(u64),
    /// A textual id, such as a user name. Any UTF-8, including `""` and NUL
    /// bytes, up to [`UserId::MAX_STR_BYTES`] bytes.
    Str(String),
}

impl UserId {
    /// The longest string id accepted, in bytes (1 KiB). Longer ids are
    /// refused with [`Error::UserIdTooLong`](crate::Error::UserIdTooLong).
    pub const MAX_STR_BYTES: usize = 1024;
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserId::Int(id) => write!(f, "{id}"),
            UserId::Str(name) => write!(f, "{name:?}"),
        }
    }
}

macro_rules! from_unsigned {
    ($($t:ty),*) => {$(
        impl From<$t> for UserId {
            fn from(id: $t) -> Self {
                UserId::Int(u64::from(id))
            }
        }
    )*};
}
from_unsigned!(u8, u16, u32, u64);

impl From<&str> for UserId {
    fn from(id: &str) -> Self {
        UserId::Str(id.to_owned())
    }
}

impl From<String> for UserId {
    fn from(id: String) -> Self {
        UserId::Str(id)
    }
}

impl From<&String> for UserId {
    fn from(id: &String) -> Self {
        UserId::Str(id.clone())
    }
}

impl From<&UserId> for UserId {
    fn from(id: &UserId) -> Self {
        id.clone()
    }
}
