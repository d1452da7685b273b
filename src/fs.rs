//! File-system helpers shared by the sled engine and the spool.

use std::io;
use std::path::Path;

use crate::{Error, Result};

/// Maps an I/O error to the error a user can act on.
pub(crate) fn io_error(path: &Path, source: io::Error) -> Error {
    let path = path.to_path_buf();
    if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28) {
        return Error::DiskFull { path, source };
    }
    if matches!(
        source.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
    ) || source.raw_os_error() == Some(30)
    {
        return Error::PermissionDenied { path, source };
    }
    Error::Storage {
        path,
        source: Box::new(source),
    }
}

/// Makes a creation, rename or removal in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| io_error(dir, e))
}
