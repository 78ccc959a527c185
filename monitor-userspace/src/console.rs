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

const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// `--log-level`: a level (debug and trace apply to stallmon itself; the libraries it uses stay
/// at info), or tracing directives `target=level,...`. Anything else is an error: a misspelt
/// level must not silently become some other filter.
pub fn log_filter(level: &str) -> Result<EnvFilter, String> {
    let l = level.trim().to_ascii_lowercase();
    let bad = || {
        format!(
            "--log-level {level:?}: expected one of {} or directives such as stallmon=debug",
            LEVELS.join(", ")
        )
    };
    let directives = match l.as_str() {
        "error" | "warn" | "info" => l.clone(),
        "debug" | "trace" => format!("info,stallmon={l}"),
        _ => {
            let ok = !l.is_empty()
                && l.split(',').all(|d| match d.split_once('=') {
                    Some((target, lvl)) => !target.is_empty() && LEVELS.contains(&lvl),
                    None => LEVELS.contains(&d),
                });
            if !ok {
                return Err(bad());
            }
            l.clone()
        }
    };
    EnvFilter::try_new(directives).map_err(|_| bad())
}

/// Sets up logging on stderr.
pub fn init_logging(format: LogFormat, filter: EnvFilter) {
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

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn log_levels_and_directives() {
        for ok in ["info", "WARN", "debug", "stallmon=debug", "info,aya=trace"] {
            assert!(log_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "verbose", "debgu", "stallmon=loud", "=debug", "info,"] {
            let e = log_filter(bad).unwrap_err();
            assert!(e.contains("--log-level"), "{bad}: {e}");
        }
    }
}
