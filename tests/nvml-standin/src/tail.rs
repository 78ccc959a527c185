//! Incremental reading of append-only line files (`busy`, `contexts`) that other processes write
//! while we read them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Largest partial (unterminated) line kept between reads; a longer one is garbage.
const MAX_PARTIAL: usize = 4096;

/// Follows one file: each [`Tail::read`] returns the complete lines appended since the previous
/// one. A trailing line without its newline yet is kept until it is completed.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    /// (device, inode) of the file read so far, to notice a replaced file.
    identity: Option<(u64, u64)>,
    offset: u64,
    lines: LineSplitter,
}

/// What one [`Tail::read`] found.
#[derive(Debug, Default, PartialEq)]
pub struct Chunk {
    /// The file was truncated or replaced since the last read: reading restarted at its start.
    pub restarted: bool,
    pub lines: Vec<String>,
    /// Lines that were not valid UTF-8 or too long.
    pub garbage: u64,
}

impl Tail {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            identity: None,
            offset: 0,
            lines: LineSplitter::default(),
        }
    }

    /// Reads what was appended since the last call. A missing file reads as empty.
    pub fn read(&mut self) -> Chunk {
        let mut chunk = Chunk::default();
        let Ok(mut file) = File::open(&self.path) else {
            return chunk;
        };
        let Ok(meta) = file.metadata() else {
            return chunk;
        };
        let identity = Some((meta.dev(), meta.ino()));
        if (self.identity.is_some() && self.identity != identity) || meta.len() < self.offset {
            chunk.restarted = true;
            self.offset = 0;
            self.lines = LineSplitter::default();
        }
        self.identity = identity;
        if meta.len() == self.offset || file.seek(SeekFrom::Start(self.offset)).is_err() {
            return chunk;
        }
        let mut buf = Vec::new();
        let Ok(n) = file.read_to_end(&mut buf) else {
            return chunk;
        };
        self.offset += n as u64;
        (chunk.lines, chunk.garbage) = self.lines.push(&buf);
        chunk
    }
}

/// Splits a byte stream into lines, keeping an unterminated tail for the next push.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    /// The partial line grew past [`MAX_PARTIAL`]: the rest of it is skipped.
    overlong: bool,
}

impl LineSplitter {
    /// Appends `bytes`; returns the completed lines (without `\n` or `\r`) and the number of
    /// garbage lines (invalid UTF-8, or longer than [`MAX_PARTIAL`]) that were dropped.
    pub fn push(&mut self, bytes: &[u8]) -> (Vec<String>, u64) {
        let mut lines = Vec::new();
        let mut garbage = 0;
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.overlong {
                self.overlong = false;
                garbage += 1;
                continue;
            }
            self.partial.extend_from_slice(head);
            let line = std::mem::take(&mut self.partial);
            match String::from_utf8(line) {
                Ok(mut s) => {
                    if s.ends_with('\r') {
                        s.pop();
                    }
                    lines.push(s);
                }
                Err(_) => garbage += 1,
            }
        }
        if !self.overlong {
            self.partial.extend_from_slice(rest);
            if self.partial.len() > MAX_PARTIAL {
                self.partial.clear();
                self.overlong = true;
            }
        }
        (lines, garbage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn partial_lines_wait_for_their_newline() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"1 2\n3 "), (vec!["1 2".to_string()], 0));
        assert_eq!(s.push(b"4"), (vec![], 0));
        assert_eq!(
            s.push(b"\n5 6\r\n\n"),
            (vec!["3 4".into(), "5 6".into(), String::new()], 0)
        );
        assert_eq!(s.push(b"\xff\xfe\n7 8\n"), (vec!["7 8".into()], 1));
    }

    #[test]
    fn overlong_partial_line_is_garbage() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(&[b'9'; MAX_PARTIAL + 1]), (vec![], 0));
        assert_eq!(s.push(b"99\n1 2\n"), (vec!["1 2".into()], 1));
    }

    #[test]
    fn tail_follows_appends_truncation_and_replacement() {
        let dir = std::env::temp_dir().join(format!("nvml-standin-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let _ = std::fs::remove_file(&path);
        let mut t = Tail::new(path.clone());
        assert_eq!(t.read(), Chunk::default(), "missing file reads as empty");

        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"a\nb").unwrap();
        assert_eq!(t.read().lines, vec!["a"]);
        assert_eq!(t.read().lines, Vec::<String>::new());
        f.write_all(b"c\n").unwrap();
        assert_eq!(t.read().lines, vec!["bc"]);

        f.set_len(0).unwrap();
        f.write_all(b"d\n").unwrap();
        let c = t.read();
        assert!(c.restarted);
        assert_eq!(c.lines, vec!["d"]);

        drop(f);
        // Replace it by another file (created while the old one exists: another inode).
        let tmp = dir.join("f.new");
        std::fs::write(&tmp, b"e\nf\ng\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let c = t.read();
        assert!(
            c.restarted,
            "a new file (other inode) is read from its start"
        );
        assert_eq!(c.lines, vec!["e", "f", "g"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
