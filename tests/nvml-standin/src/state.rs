//! The library's state between `nvmlInit*` and the matching `nvmlShutdown`.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::contexts::{Contexts, process_alive, process_exists};
use crate::errfile::parse_error_file;
use crate::ffi::{NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_UNINITIALIZED, nvmlReturn_t};
use crate::scenario::{GpuSpec, Scenario};
use crate::tail::Tail;
use crate::timeline::Timeline;

/// Environment variable naming the scenario directory.
pub const DIR_ENV: &str = "STALLMON_STANDIN_DIR";

/// Everything behind the library's one lock.
pub struct Global {
    /// `nvmlInit*` calls not yet matched by `nvmlShutdown` (NVML is reference counted).
    pub refcount: u32,
    pub state: Option<State>,
    /// Code and detailed text of the last failed `nvmlInit*`, for `nvmlErrorString`.
    pub init_failure: Option<(nvmlReturn_t, &'static CStr)>,
    /// Every detailed text handed out (they must live forever; identical ones are reused).
    messages: Vec<&'static CStr>,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global {
    refcount: 0,
    state: None,
    init_failure: None,
    messages: Vec::new(),
});

/// Locks the state (a panic while it was held does not make it unusable).
pub fn global() -> MutexGuard<'static, Global> {
    GLOBAL.lock().unwrap_or_else(|e| e.into_inner())
}

impl Global {
    /// A `'static` C string with `text`.
    pub fn intern(&mut self, text: &str) -> &'static CStr {
        let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
        if let Some(m) = self.messages.iter().find(|m| **m == c.as_c_str()) {
            return m;
        }
        let leaked: &'static CStr = Box::leak(c.into_boxed_c_str());
        self.messages.push(leaked);
        leaked
    }
}

/// Monotonic ns (`CLOCK_MONOTONIC`, like Python's `time.monotonic_ns()`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` in ns, read once.
fn realtime_offset_ns() -> i128 {
    let m0 = monotonic_ns();
    let r = clock_ns(libc::CLOCK_REALTIME);
    let m1 = monotonic_ns();
    i128::from(r) - (i128::from(m0) + i128::from(m1)) / 2
}

/// An initialized library: the scenario and the per-GPU readers.
pub struct State {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC` at init: NVML sample timestamps are realtime µs.
    pub offset_ns: i128,
    pub gpus: Vec<Gpu>,
}

impl State {
    /// Reads `$STALLMON_STANDIN_DIR/scenario.json`; the time origin of the samples is now.
    pub fn load() -> Result<Self, (nvmlReturn_t, String)> {
        let dir = match std::env::var_os(DIR_ENV) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => {
                return Err((
                    NVML_ERROR_LIBRARY_NOT_FOUND,
                    format!(
                        "stallmon NVML stand-in: {DIR_ENV} is not set (it names the scenario directory)"
                    ),
                ));
            }
        };
        let path = dir.join("scenario.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            (
                NVML_ERROR_LIBRARY_NOT_FOUND,
                format!(
                    "stallmon NVML stand-in: cannot read {}: {e}",
                    path.display()
                ),
            )
        })?;
        let scenario = Scenario::parse(&text).map_err(|e| {
            (
                NVML_ERROR_UNINITIALIZED,
                format!("stallmon NVML stand-in: invalid {}: {e}", path.display()),
            )
        })?;
        let origin_ns = monotonic_ns();
        let offset_ns = realtime_offset_ns();
        let period_ns = scenario.sample_period_ms * 1_000_000;
        let lag_ns = scenario.lag_ms * 1_000_000;
        let gpus = scenario
            .gpus
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let timeline = Timeline::new(origin_ns, period_ns, lag_ns);
                Gpu::new(&dir, i, spec, timeline, scenario.zombie_contexts)
            })
            .collect();
        Ok(Self { offset_ns, gpus })
    }

    /// The monotonic-to-realtime conversion of this initialization.
    pub fn clock(&self) -> StateClock {
        StateClock {
            offset_ns: self.offset_ns,
        }
    }
}

/// One simulated GPU.
pub struct Gpu {
    pub index: u32,
    pub spec: GpuSpec,
    dir: PathBuf,
    busy: Tail,
    timeline: Timeline,
    contexts_file: Tail,
    contexts: Contexts,
    /// Zombies keep their contexts (`zombie_contexts`).
    zombie_contexts: bool,
    /// Garbage found by the line readers (invalid UTF-8, overlong lines).
    raw_garbage: u64,
    /// Problems already reported on stderr.
    warned: Vec<&'static str>,
}

impl Gpu {
    fn new(
        dir: &Path,
        index: usize,
        spec: GpuSpec,
        timeline: Timeline,
        zombie_contexts: bool,
    ) -> Self {
        let dir = dir.join(format!("gpu{index}"));
        Self {
            index: index as u32,
            spec,
            busy: Tail::new(dir.join("busy")),
            contexts_file: Tail::new(dir.join("contexts")),
            dir,
            timeline,
            contexts: Contexts::default(),
            zombie_contexts,
            raw_garbage: 0,
            warned: Vec::new(),
        }
    }

    fn warn_once(&mut self, what: &'static str, msg: impl FnOnce() -> String) {
        if !self.warned.contains(&what) {
            self.warned.push(what);
            eprintln!("stallmon NVML stand-in: GPU {}: {}", self.index, msg());
        }
    }

    /// The failure injected for `function` by the `error` file, if any. `lookup`: a handle
    /// lookup. The file is read at every call, so it can appear and disappear at any time.
    pub fn injected_error(&mut self, function: &str, lookup: bool) -> Option<nvmlReturn_t> {
        let path = self.dir.join("error");
        let text = std::fs::read_to_string(&path).ok()?;
        match parse_error_file(&text) {
            Ok(Some(rule)) => rule.applies(function, lookup).then_some(rule.code),
            Ok(None) => None,
            Err(e) => {
                self.warn_once("error file", || format!("ignoring {}: {e}", path.display()));
                None
            }
        }
    }

    /// Sleeps for the milliseconds the `delay` file asks for (a driver call that hangs).
    pub fn injected_delay(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.dir.join("delay")) else {
            return;
        };
        match text.split_whitespace().next().map(str::parse::<u64>) {
            Some(Ok(ms)) => std::thread::sleep(std::time::Duration::from_millis(ms.min(600_000))),
            None => {}
            Some(Err(_)) => {
                let path = self.dir.join("delay");
                self.warn_once("delay file", || {
                    format!("ignoring {}: want milliseconds", path.display())
                });
            }
        }
    }

    /// Reads what was appended to `busy` and `contexts` and publishes the periods that are due.
    pub fn refresh(&mut self, now_ns: u64) {
        let chunk = self.busy.read();
        self.raw_garbage += chunk.garbage;
        let (garbage, late) = (self.timeline.garbage, self.timeline.late);
        for line in &chunk.lines {
            self.timeline.ingest_line(line);
        }
        if self.timeline.garbage > garbage || chunk.garbage > 0 {
            let path = self.dir.join("busy");
            self.warn_once("busy garbage", || {
                format!(
                    "ignoring malformed lines in {} (want \"<start_ns> <end_ns>\")",
                    path.display()
                )
            });
        }
        if self.timeline.late > late {
            self.warn_once("busy late", || {
                "ignoring busy intervals that arrived after their sample was published (raise lag_ms)"
                    .into()
            });
        }
        self.timeline.publish(now_ns);

        let chunk = self.contexts_file.read();
        self.raw_garbage += chunk.garbage;
        if chunk.restarted {
            self.contexts.clear();
        }
        let garbage = self.contexts.garbage;
        for line in &chunk.lines {
            self.contexts.apply_line(line);
        }
        if self.contexts.garbage > garbage || chunk.garbage > 0 {
            let path = self.dir.join("contexts");
            self.warn_once("contexts garbage", || {
                format!(
                    "ignoring malformed lines in {} (want \"<pid>\" or \"-<pid>\")",
                    path.display()
                )
            });
        }
    }

    /// Published samples newer than `last_seen_us` (realtime µs), oldest first.
    pub fn samples_after(&self, clock: StateClock, last_seen_us: u64) -> Vec<(u64, f64)> {
        self.timeline
            .samples()
            .iter()
            .map(|s| (clock.to_realtime_us(s.end_ns), s.percent))
            .filter(|&(ts, _)| ts > last_seen_us)
            .collect()
    }

    /// Processes holding a context that still exist (zombies too, with `zombie_contexts`).
    pub fn live_contexts(&mut self) -> Vec<u32> {
        if self.zombie_contexts {
            self.contexts.live(process_exists).to_vec()
        } else {
            self.contexts.live(process_alive).to_vec()
        }
    }

    /// Utilization (0..=1) of the newest published sample, which drives the gauges.
    pub fn recent_utilization(&self) -> f64 {
        self.timeline.recent_utilization()
    }

    /// Malformed lines read so far from `busy` and `contexts`.
    pub fn garbage_lines(&self) -> u64 {
        self.raw_garbage + self.timeline.garbage + self.contexts.garbage
    }

    /// `busy` intervals ignored because they came too late (or predate the timeline).
    pub fn late_lines(&self) -> u64 {
        self.timeline.late
    }
}

/// The clock conversion of a [`State`], separable from its GPUs for borrowing.
#[derive(Clone, Copy, Debug)]
pub struct StateClock {
    pub offset_ns: i128,
}

impl StateClock {
    /// Realtime µs (NVML's sample timestamp unit) of a monotonic ns.
    pub fn to_realtime_us(&self, mono_ns: u64) -> u64 {
        ((i128::from(mono_ns) + self.offset_ns).max(0) / 1000) as u64
    }
}
