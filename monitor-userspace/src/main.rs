//! `stallmon`: why are our GPUs idle?
//!
//! The data flows through one module per stage:
//!
//! 1. kernel probes and their maps: [`kernel`] (programs in the `monitor-ebpf` crate, wire types
//!    in `monitor-common`);
//! 2. collectors: [`collector`] (maps → snapshots and worker states), [`gpu`] (NVML);
//! 3. discovery: [`discover`] (jobs, ranks, feeders, workers, launchers → the kernel's tables);
//! 4. attribution: [`attribution`] (per rank: GPU idle seconds → io / preprocess / host /
//!    other), [`verdict`];
//! 5. accounting: [`interval`] (snapshots → typed interval lines) and [`ledger`] (lines →
//!    running totals);
//! 6. exporters: [`exporter`] (`/metrics`, `/healthz`), [`record`] (the record file),
//!    [`summary`] (the exit summary), [`report`] (the summary of a record, offline).
//!
//! [`schema`] holds every file format; [`session`] runs the clock; [`cmd`] are the commands;
//! [`cli`] turns flags into settings; [`target`], [`preflight`] and [`privileges`] deal with
//! the traced process and the host.
mod attribution;
mod cli;
mod cmd;
mod collector;
mod console;
mod discover;
mod exporter;
mod gpu;
mod hist;
mod interval;
mod kernel;
mod ledger;
mod podresources;
mod preflight;
mod privileges;
mod record;
mod report;
mod schema;
mod session;
mod summary;
mod target;
mod verdict;

use std::{ffi::OsString, process::ExitCode};

use clap::Parser;

/// Raises the soft limit on open files to the hard one: the endpoint bounds its own
/// connections, and what is left is the tracer's (maps, /proc files).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer; setrlimit with values read back from getrlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            // A command started under the tracer gets the limit it would have had.
            let _ = target::ORIGINAL_NOFILE.set((lim.rlim_cur, lim.rlim_max));
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
        }
    }
}

fn main() -> ExitCode {
    // The trampoline used by `trace -- COMMAND` (see target::spawn_gated): never returns on
    // success.
    let raw: Vec<OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == target::GATE_SUBCOMMAND) {
        let e = target::exec_after_gate(&raw[2..]);
        console::err(&format!("stallmon: error: {e:#}\n"));
        return ExitCode::from(127);
    }
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            console::out(&e.render().to_string());
            return ExitCode::from(0);
        }
        Err(e) => {
            // One line, like every other error (clap's usage hint follows on its own lines
            // only when the command line itself is malformed).
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("bad command line")
                .trim_start_matches("error: ");
            console::err(&format!("stallmon: error: {first}\n"));
            return ExitCode::from(2);
        }
    };
    raise_fd_limit();
    match console::log_filter(&cli.log_level) {
        Ok(filter) => console::init_logging(cli.log_format, filter),
        Err(e) => {
            console::err(&format!("stallmon: error: {e}\n"));
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        cli::Cmd::Check { no_load, nvml_lib } => Ok(preflight::report(&preflight::run_all(
            !no_load,
            nvml_lib.as_deref(),
        ))),
        cli::Cmd::Report { file, json } => report::run(&file, json),
        cli::Cmd::Trace(t) => cmd::trace::run(t),
        cli::Cmd::Node(n) => cmd::node::run(n),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            console::err(&format!("stallmon: error: {e:#}\n"));
            ExitCode::from(1)
        }
    }
}
