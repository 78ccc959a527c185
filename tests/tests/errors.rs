//! Bad input gets a one-line error and a non-zero exit, never a panic or a silent wrong answer:
//! unknown PID, a thread id, init and stallmon itself, missing privileges, missing BTF or tracefs,
//! port in use, a command that cannot start, out-of-range durations, a closed stderr.
use std::{
    net::TcpListener,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{Tracer, job, procs::Reaper, require_privileged, stallmon_bin};

fn stallmon(args: &[&str]) -> std::process::Output {
    Command::new(stallmon_bin()).args(args).output().unwrap()
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit status `code` and a one-line error containing `needle`.
fn one_line_error(o: &std::process::Output, code: i32, needle: &str) {
    let e = stderr_of(o);
    assert_eq!(o.status.code(), Some(code), "{e}");
    assert!(e.contains(needle), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// Runs `stallmon trace --listen 127.0.0.1:0 -- true` with `env` set and asserts a one-line
/// error containing `needle` and exit status 1.
fn expect_trace_error(env: (&str, &str), needle: &str) {
    let o = Command::new(stallmon_bin())
        .args(["trace", "--listen", "127.0.0.1:0", "--", "true"])
        .env(env.0, env.1)
        .output()
        .unwrap();
    one_line_error(&o, 1, needle);
}

#[test]
fn unknown_pid_is_a_clear_error() {
    require_privileged();
    let o = stallmon(&["trace", "--listen", "127.0.0.1:0", "--pid", "4000000"]);
    one_line_error(&o, 1, "no such process: PID 4000000");
}

#[test]
fn init_and_stallmon_itself_are_refused() {
    require_privileged();
    let o = stallmon(&["trace", "--listen", "127.0.0.1:0", "--pid", "1"]);
    one_line_error(&o, 1, "PID 1 is init");
    // stallmon's own PID: a shell that execs stallmon with its own PID as the target.
    let o = Command::new("sh")
        .args([
            "-c",
            &format!(
                "exec {} trace --listen 127.0.0.1:0 --pid $$",
                stallmon_bin().display()
            ),
        ])
        .output()
        .unwrap();
    one_line_error(&o, 1, "is stallmon itself");
}

/// `--pid` given a thread id traces the thread's process, and says so.
#[test]
fn a_thread_id_traces_its_process() {
    require_privileged();
    let py = tests::python();
    let mut child = Reaper(
        Command::new(&py)
            .args([
                "-c",
                "import threading, time, os, sys\n\
                 def spin():\n    time.sleep(60)\n\
                 t = threading.Thread(target=spin); t.start()\n\
                 print(t.native_id, flush=True)\n\
                 while True:\n    os.read(os.open('/proc/self/stat', os.O_RDONLY), 100); time.sleep(0.01)\n",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let tid = line.trim().to_string();
    assert_ne!(tid, child.pid().to_string());
    let tracer =
        Tracer::start(&["--pid", &tid, "--no-gpu", "--json", "--interval", "0.2"]).unwrap();
    assert_eq!(tracer.ready["target_pid"], child.pid());
    std::thread::sleep(Duration::from_secs(1));
    let done = tracer.stop().unwrap();
    assert!(
        done.stderr
            .contains(&format!("PID {tid} is a thread of process {}", child.pid())),
        "{}",
        done.stderr
    );
    let s = done.summary().unwrap();
    assert_eq!(job(&s)["root_pid"], child.pid());
    let syscalls = job(&s)["task_io"][0]["read_syscalls"].as_u64().unwrap();
    assert!(syscalls > 10, "the process's reads were traced: {syscalls}");
}

#[test]
fn non_root_is_a_clear_error() {
    require_privileged();
    let o = Command::new(stallmon_bin())
        .args(["trace", "--listen", "127.0.0.1:0", "--pid", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    one_line_error(&o, 1, "needs root or CAP_BPF+CAP_PERFMON");
}

#[test]
fn missing_btf_and_tracefs_are_clear_errors() {
    require_privileged();
    expect_trace_error(
        ("STALLMON_BTF_PATH", "/nonexistent/vmlinux"),
        "kernel BTF not found at /nonexistent/vmlinux",
    );
    expect_trace_error(
        ("STALLMON_TRACEFS", "/nonexistent/tracing"),
        "tracefs is not mounted at /nonexistent/tracing",
    );

    // `stallmon check` reports the same as FAIL lines and exits non-zero.
    let o = Command::new(stallmon_bin())
        .args(["check", "--no-load"])
        .env("STALLMON_TRACEFS", "/nonexistent/tracing")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("FAIL  tracefs"), "{out}");
}

#[test]
fn check_passes_on_this_machine() {
    require_privileged();
    let o = stallmon(&["check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("PASS  load and attach"), "{out}");
    assert!(
        out.contains("WARN  NVML") || out.contains("PASS  NVML"),
        "{out}"
    );
    // With the stand-in library, NVML passes and says it is simulated.
    let gpus = tests::gpu::StandinGpus::new("check", 2, 100, 300);
    let mut args = vec!["check".to_string(), "--no-load".into()];
    args.extend(gpus.args());
    let o = Command::new(stallmon_bin())
        .args(&args)
        .envs(gpus.env())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("PASS  NVML") && out.contains("2 GPU(s)") && out.contains("simulated"),
        "{out}"
    );
}

#[test]
fn port_in_use_is_a_clear_error() {
    require_privileged();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let o = stallmon(&["trace", "--listen", &addr, "--", "true"]);
    one_line_error(
        &o,
        1,
        &format!("cannot listen on {addr}: address already in use"),
    );
}

#[test]
fn command_that_cannot_start_is_a_clear_error() {
    require_privileged();
    let o = stallmon(&[
        "trace",
        "--listen",
        "127.0.0.1:0",
        "--",
        "/nonexistent/train.py",
    ]);
    one_line_error(&o, 1, "cannot start command \"/nonexistent/train.py\"");
}

/// Durations out of range and malformed values: one line, exit 2, no panic.
#[test]
fn bad_durations_are_one_line_errors() {
    for (flag, value) in [
        ("--interval", "1e300"),
        ("--duration", "1e20"),
        ("--interval", "-1"),
        ("--interval", "nan"),
        ("--duration", "5 parsecs"),
        ("--interval", "2h"),
    ] {
        let o = stallmon(&["trace", &format!("{flag}={value}"), "--", "true"]);
        one_line_error(&o, 2, flag);
    }
    // Human durations are accepted.
    let o = stallmon(&["trace", "--interval", "250ms", "--duration", "1m", "--help"]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn command_exit_status_is_passed_through() {
    require_privileged();
    let o = stallmon(&[
        "trace",
        "--listen",
        "127.0.0.1:0",
        "--no-gpu",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("stallmon summary"));
}

/// `stallmon trace -- job 2>&1 | head -c 10`: stderr and stdout closed early must not panic
/// stallmon or change the job's exit status.
#[test]
fn closed_stderr_keeps_the_exit_status() {
    require_privileged();
    let script = format!(
        "{} trace --listen 127.0.0.1:0 --no-gpu -- sh -c 'sleep 0.5; exit 3' 2>&1 | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}",
        stallmon_bin().display()
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.trim(),
        "3",
        "stallmon's status with a closed stderr: {out}"
    );
}

#[test]
fn target_exiting_mid_run_ends_with_a_summary() {
    require_privileged();
    let sleeper = Reaper(Command::new("sleep").arg("2").spawn().unwrap());
    let pid = sleeper.pid().to_string();
    let t0 = Instant::now();
    let done = Tracer::start(&["--pid", &pid, "--json", "--no-gpu"])
        .unwrap()
        .wait()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        done.stderr.contains("stopped (target exited)"),
        "{}",
        done.stderr
    );
    let s = done.summary().unwrap();
    assert_eq!(job(&s)["root_pid"].as_u64().unwrap().to_string(), pid);
}

#[test]
fn sigterm_detaches_cleanly_and_flushes_the_record() {
    require_privileged();
    let sleeper = Reaper(Command::new("sleep").arg("100").spawn().unwrap());
    let pid = sleeper.pid().to_string();
    let record = tests::scratch_dir("record").join("trace.jsonl");
    let _ = std::fs::remove_file(&record);
    let tracer = Tracer::start(&[
        "--pid",
        &pid,
        "--no-gpu",
        "--interval",
        "0.3",
        "--record",
        record.to_str().unwrap(),
    ])
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGTERM) };
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        done.stderr.contains("stopped (terminated)"),
        "{}",
        done.stderr
    );
    let text = std::fs::read_to_string(&record).unwrap();
    let types: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("header"));
    assert!(
        types.iter().filter(|t| *t == "interval").count() >= 2,
        "{types:?}"
    );
    assert_eq!(types.last().map(String::as_str), Some("summary"));
    // The target survives its tracer.
    assert!(tests::procs::alive(sleeper.pid()));
}

#[test]
fn duration_stops_tracing() {
    require_privileged();
    let sleeper = Reaper(Command::new("sleep").arg("100").spawn().unwrap());
    let pid = sleeper.pid().to_string();
    let t0 = Instant::now();
    let done = Tracer::start(&["--pid", &pid, "--no-gpu", "--duration", "1.5", "--json"])
        .unwrap()
        .wait()
        .unwrap();
    assert!(done.status.success());
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(done.stderr.contains("stopped (duration reached)"));
    assert!(
        done.summary().unwrap()["duration_seconds"]
            .as_f64()
            .unwrap()
            >= 1.5
    );
}

/// Settings that are legal but probably wrong get a warning.
#[test]
fn risky_settings_are_warned_about() {
    require_privileged();
    let o = stallmon(&[
        "trace",
        "--listen",
        "0.0.0.0:0",
        "--interval",
        "2m",
        "--duration",
        "1s",
        "--no-gpu",
        "--",
        "sleep",
        "3",
    ]);
    let e = stderr_of(&o);
    assert!(e.contains("reachable from other hosts"), "{e}");
    assert!(e.contains("--interval 2m"), "{e}");
    assert!(e.contains("shorter than --interval"), "{e}");
}
