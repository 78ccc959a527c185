//! Output that never panics: logs (text with timestamps, or JSON lines) and the few lines
//! stallmon prints. A closed stdout or stderr (`stallmon trace -- job 2>&1 | head -c 10`) must
//! not stop the tracer or change the job's exit status, so every write here ignores errors.
use std::io::Write;

use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

use crate::cli::LogFormat;

/// stderr, with write errors (EPIPE, EBADF) swallowed.
#[derive(Clone, Copy)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Sets up logging on stderr.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Writes to stdout, ignoring errors.
pub fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

/// Writes to stderr, ignoring errors.
pub fn err(text: &str) {
    let _ = Stderr.write(text.as_bytes());
}
