//! Writing the record file (`--record`), safely: stallmon is root and the path may sit in a
//! directory a job's user controls.
//!
//! - The file is created new (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600: its job lines hold command
//!   lines, passwords included); an existing path is refused, never truncated. With
//!   `--record-append` an existing file is appended to, but only a regular file owned by
//!   stallmon's user, opened without following links and checked on the open descriptor.
//! - Nothing but a regular file: FIFOs, devices and sockets are refused at start (a FIFO with no
//!   reader would otherwise block forever).
//! - Every problem is found before the job starts; once tracing, a write that fails (disk full)
//!   is counted (`stallmon_record_errors_total`), said once, and tracing goes on.
//! - Each interval line is flushed and synced to disk when written: a crash loses at most the
//!   interval in progress.
use std::{
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::schema::record::Line;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "record file {0}: already exists (stallmon never overwrites a file; pick a new name, or add --record-append to append to a record it wrote)"
    )]
    Exists(PathBuf),
    #[error("record file {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("record file {0}: not a regular file ({1}); refusing to write there")]
    NotRegular(PathBuf, &'static str),
    #[error(
        "record file {0}: owned by uid {1}, not by stallmon's user (uid {2}); refusing to append"
    )]
    Owner(PathBuf, u32, u32),
    #[error("record file {0}: is a symbolic link; refusing to follow it")]
    Symlink(PathBuf),
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens the record file (see the module documentation for the rules).
pub fn open(path: &Path, append: bool) -> Result<File, RecordError> {
    let p = path.to_path_buf();
    let mut opts = std::fs::OpenOptions::new();
    // O_NONBLOCK: opening a FIFO must not wait for a reader (it is refused right after).
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .mode(0o600);
    if append {
        opts.append(true).create(true);
    } else {
        opts.write(true).create_new(true);
    }
    let file = opts.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => RecordError::Exists(p.clone()),
        Some(libc::ELOOP) => RecordError::Symlink(p.clone()),
        Some(libc::ENXIO) => RecordError::NotRegular(p.clone(), "a FIFO with no reader"),
        _ => RecordError::Open(p.clone(), e),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| RecordError::Open(p.clone(), e))?;
    if !meta.file_type().is_file() {
        return Err(RecordError::NotRegular(p, kind_of(&meta)));
    }
    // SAFETY: trivial libc call.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(RecordError::Owner(p, meta.uid(), me));
    }
    // Back to blocking writes.
    // SAFETY: valid fd; flags read and written back without O_NONBLOCK.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    // Appending to an older, more permissive file: tighten it.
    let _ = file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600));
    Ok(file)
}

/// The record file being written.
pub struct Recorder {
    out: BufWriter<File>,
    path: PathBuf,
    errors: u64,
}

impl Recorder {
    pub fn new(file: File, path: &Path) -> Self {
        Self {
            out: BufWriter::new(file),
            path: path.to_path_buf(),
            errors: 0,
        }
    }

    fn failed(&mut self, e: std::io::Error) {
        if self.errors == 0 {
            tracing::error!(
                "writing the record file {} failed ({e}); tracing goes on, failures are counted in stallmon_record_errors_total",
                self.path.display()
            );
        }
        self.errors += 1;
    }

    /// Writes one line (buffered). A failure is counted, never returned.
    pub fn line(&mut self, line: &Line) {
        let r = serde_json::to_writer(&mut self.out, line)
            .map_err(std::io::Error::other)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = r {
            self.failed(e);
        }
    }

    /// Flushes and syncs what was written: it survives a crash from now on.
    pub fn sync(&mut self) {
        if let Err(e) = self
            .out
            .flush()
            .and_then(|()| self.out.get_ref().sync_data())
        {
            self.failed(e);
        }
    }

    /// Lines (or syncs) that failed so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("stallmon-record-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn creates_new_private_files_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("new");
        let p = d.join("run.jsonl");
        let f = open(&p, false).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        drop(f);
        assert!(matches!(open(&p, false), Err(RecordError::Exists(_))));
        // Append to our own file works.
        assert!(open(&p, true).is_ok());
        // A symlink planted where the record goes is never followed.
        let target = d.join("victim");
        std::fs::write(&target, "precious").unwrap();
        let link = d.join("link.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open(&link, false).is_err());
        assert!(matches!(open(&link, true), Err(RecordError::Symlink(_))));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        // A FIFO (no reader) and a device are refused at once.
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(open(&fifo, true).is_err());
        assert!(matches!(
            open(Path::new("/dev/full"), true),
            Err(RecordError::NotRegular(..))
        ));
        assert!(matches!(
            open(&d.join("missing/run.jsonl"), false),
            Err(RecordError::Open(..))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
