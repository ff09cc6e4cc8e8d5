//! Reading a region from another process: [`Reader`] maps the file read-only, refuses what is
//! not a regular file, validates the header (`parse.rs`) and takes snapshots (`snapshot.rs`).

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::ReadError;
use crate::layout;
use crate::parse::{self, HeaderInfo};
use crate::snapshot::{self, MetaCache, Snapshot};
use crate::view::View;

/// What a file that is not a regular file is, in words; `None` for a regular file.
fn not_a_file(kind: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("folder")
    } else if kind.is_fifo() {
        Some("named pipe (FIFO)")
    } else if kind.is_socket() {
        Some("socket")
    } else if kind.is_char_device() {
        Some("character device")
    } else if kind.is_block_device() {
        Some("block device")
    } else {
        Some("special file")
    }
}

/// A region mapped read-only.
pub struct Reader {
    path: PathBuf,
    file: File,
    _map: MmapRaw,
    view: View,
    header: HeaderInfo,
    metas: MetaCache,
}

impl Reader {
    /// Maps the region at `path` read-only and validates its header.
    #[allow(unsafe_code)] // Maps the region.
    pub fn open(path: &Path) -> Result<Reader, ReadError> {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking, so that opening a named pipe returns at once (without it, the open
        // waits for a writer forever); its type is refused just below. O_NONBLOCK changes
        // nothing for a regular file.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| ReadError::Open {
                path: path.to_owned(),
                source,
            })?;
        let metadata = file.metadata().map_err(|source| ReadError::Open {
            path: path.to_owned(),
            source,
        })?;
        if let Some(kind) = not_a_file(metadata.file_type()) {
            return Err(ReadError::NotAFile {
                path: path.to_owned(),
                kind,
            });
        }
        let len = metadata.len();
        if len < layout::HEADER_SIZE {
            // Too short to hold even a header: tell a foreign file from a cut-short region.
            let mut head = Vec::new();
            use std::io::Read;
            let _ = (&file).take(8).read_to_end(&mut head);
            if !layout::MAGIC.starts_with(&head) {
                return Err(ReadError::Foreign {
                    path: path.to_owned(),
                });
            }
            return Err(ReadError::Truncated {
                path: path.to_owned(),
                expected: layout::HEADER_SIZE,
                actual: len,
            });
        }
        let map = MmapOptions::new()
            .map_raw_read_only(&file)
            .map_err(|source| ReadError::Map {
                path: path.to_owned(),
                source,
            })?;
        // SAFETY: the mapping is page-aligned, `map.len()` bytes long, and kept in `_map` for as
        // long as the view is used.
        let view = unsafe { View::new(map.as_ptr(), map.len()) };
        let header = parse::read_header(path, view)?;
        Ok(Reader {
            path: path.to_owned(),
            file,
            _map: map,
            view,
            header,
            metas: MetaCache::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> HeaderInfo {
        self.header
    }

    /// Every stat, consistent with respect to retirements.
    ///
    /// A file cut short under the mapping would fault on access (SIGBUS), so its size is checked
    /// first; only a truncation in the instant between the check and the read remains possible,
    /// and only by the file's owner (the region is mode 0640).
    pub fn snapshot(&self) -> Result<Snapshot, ReadError> {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if size < self.header.offsets.size {
            return Err(ReadError::Truncated {
                path: self.path.clone(),
                expected: self.header.offsets.size,
                actual: size,
            });
        }
        snapshot::take(&self.path, self.view, &self.header, &self.metas)
    }
}
