//! Unit and property tests of the attribution engine.
use super::*;
use proptest::prelude::*;

const MS: u64 = 1_000_000;
const ON: u32 = STATE_ON_CPU;
const STO: u32 = STATE_STORAGE_WAIT;
const IPC: u32 = STATE_IPC_WAIT;
const OTH: u32 = STATE_OTHER_WAIT;

fn sample(start_ms: u64, end_ms: u64, util: f64) -> UtilSample {
    UtilSample {
        end_ns: end_ms * MS,
        period_ns: (end_ms - start_ms) * MS,
        util,
    }
}

/// A worker slice; `state_ms` gives on_cpu, storage, ipc, other (cpu_wait 0).
fn slice(start_ms: u64, end_ms: u64, state_ms: [u64; 4]) -> WorkerSlice {
    let mut state_ns = [0; NUM_STATES];
    for (a, b) in state_ns.iter_mut().zip(state_ms) {
        *a = b * MS;
    }
    WorkerSlice {
        start_ns: start_ms * MS,
        end_ns: end_ms * MS,
        state_ns,
    }
}

/// Runs a whole scenario: feeder events (ms), worker slices, samples of GPU 0.
fn run(
    allocation: Allocation,
    feeder: &[(u64, u32)],
    workers: &[WorkerSlice],
    samples: &[UtilSample],
) -> GpuTotals {
    let mut a = Attributor::new(AttributorConfig {
        allocation,
        ..AttributorConfig::default()
    });
    for &(t, s) in feeder {
        a.push_feeder_event(t * MS, s);
    }
    for &w in workers {
        a.push_worker_slice(w);
    }
    a.push_gpu_samples(0, samples);
    a.flush();
    a.totals().remove(0)
}

fn ms(s: f64) -> f64 {
    (s * 1e3 * 1e6).round() / 1e6
}

fn causes_ms(t: &GpuTotals) -> [f64; 4] {
    t.idle_s.map(ms)
}

fn idle_workers(end_ms: u64) -> Vec<WorkerSlice> {
    vec![slice(0, end_ms, [0; 4])]
}

#[test]
fn feeder_storage_wait_is_io() {
    // 100 ms period, GPU 20% busy; feeder reads 80 ms, on CPU 20 ms.
    let t = run(
        Allocation::Priority,
        &[(0, STO), (80, ON)],
        &idle_workers(100),
        &[sample(0, 100, 0.2)],
    );
    assert_eq!(causes_ms(&t), [80.0, 0.0, 0.0, 0.0]);
    assert_eq!(ms(t.io_feeder_s), 80.0);
    assert_eq!(ms(t.busy_s), 20.0);
    assert_eq!(ms(t.wall_s), 100.0);
    assert_eq!(t.samples, 1);
}

#[test]
fn feeder_on_cpu_is_host_after_data_waits() {
    // Idle 50 ms: 30 ms of reads fit entirely, host takes the remaining 20 of its 70.
    let t = run(
        Allocation::Priority,
        &[(0, STO), (30, ON)],
        &idle_workers(100),
        &[sample(0, 100, 0.5)],
    );
    assert_eq!(causes_ms(&t), [30.0, 0.0, 20.0, 0.0]);
    // Proportional: everything scaled by idle/period = 0.5.
    let t = run(
        Allocation::Proportional,
        &[(0, STO), (30, ON)],
        &idle_workers(100),
        &[sample(0, 100, 0.5)],
    );
    assert_eq!(causes_ms(&t), [15.0, 0.0, 35.0, 0.0]);
}

#[test]
fn other_wait_and_unknown_are_other() {
    // Unknown before 20 ms, other_wait 20..60, on CPU 60..100; GPU fully idle.
    let t = run(
        Allocation::Priority,
        &[(20, OTH), (60, ON)],
        &idle_workers(100),
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [0.0, 0.0, 40.0, 60.0]);
    // Explicit unknown (e.g. feeder exited), and out-of-range states mean unknown too.
    let t = run(
        Allocation::Priority,
        &[(0, ON), (50, STATE_UNKNOWN), (70, 17)],
        &idle_workers(100),
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [0.0, 0.0, 50.0, 50.0]);
}

#[test]
fn ipc_wait_splits_by_worker_activity() {
    // Feeder waits for a batch the whole period; workers: 60 ms storage, 20 ms CPU in each
    // 50 ms slice (several workers): active >= covered, so the wait is fully explained.
    let workers = [
        slice(0, 50, [20, 60, 5, 0]),
        slice(50, 100, [20, 60, 0, 30]),
    ];
    let t = run(
        Allocation::Priority,
        &[(0, IPC)],
        &workers,
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [75.0, 25.0, 0.0, 0.0]);
    assert_eq!(t.io_feeder_s, 0.0);
}

#[test]
fn workers_waiting_for_a_cpu_are_preprocessing() {
    // Two CPU-bound workers on a busy machine: each runs 25 ms and waits 75 ms for a CPU per
    // 100 ms; the feeder waits for their batch the whole period: preprocess, not other.
    let mut w = slice(0, 100, [50, 0, 0, 0]);
    w.state_ns[STATE_CPU_WAIT as usize] = 150 * MS;
    let t = run(
        Allocation::Priority,
        &[(0, IPC)],
        &[w],
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [0.0, 100.0, 0.0, 0.0]);
    // The feeder itself waiting for a CPU is other (it cannot launch work, but not for data).
    let t = run(
        Allocation::Priority,
        &[(0, STATE_CPU_WAIT)],
        &idle_workers(100),
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [0.0, 0.0, 0.0, 100.0]);
}

#[test]
fn ipc_wait_with_idle_workers_is_other() {
    // Workers blocked on their index queues (ipc_wait) while the feeder waits: not data.
    let workers = [slice(0, 100, [0, 0, 400, 0])];
    let t = run(
        Allocation::Priority,
        &[(0, IPC)],
        &workers,
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [0.0, 0.0, 0.0, 100.0]);
    // No worker data at all: the same.
    let t = run(
        Allocation::Priority,
        &[(0, IPC)],
        &[],
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [0.0, 0.0, 0.0, 100.0]);
    // Workers busy a quarter of a worker-equivalent: a quarter of the wait is explained.
    let workers = [slice(0, 100, [25, 0, 300, 0])];
    let t = run(
        Allocation::Priority,
        &[(0, IPC)],
        &workers,
        &[sample(0, 100, 0.0)],
    );
    assert_eq!(causes_ms(&t), [0.0, 25.0, 0.0, 75.0]);
}

#[test]
fn worker_slices_are_pro_rated() {
    // GPU period 50..150 sees half of each slice: first 100 ms all storage, second all CPU.
    let workers = [
        slice(0, 100, [0, 100, 0, 0]),
        slice(100, 200, [300, 0, 0, 0]),
    ];
    let t = run(
        Allocation::Priority,
        &[(0, IPC)],
        &workers,
        &[sample(50, 150, 0.0)],
    );
    // storage 50, cpu 150 -> 1:3.
    assert_eq!(causes_ms(&t), [25.0, 75.0, 0.0, 0.0]);
}

#[test]
fn data_waits_exceeding_idle_are_scaled_down() {
    // Feeder: 40 storage, 40 ipc (workers all CPU), 20 CPU; idle only 40 ms.
    let workers = [slice(0, 100, [100, 0, 0, 0])];
    let t = run(
        Allocation::Priority,
        &[(0, STO), (40, IPC), (80, ON)],
        &workers,
        &[sample(0, 100, 0.6)],
    );
    assert_eq!(causes_ms(&t), [20.0, 20.0, 0.0, 0.0]);
    assert_eq!(ms(t.io_feeder_s), 20.0);
    let sum: f64 = t.idle_s.iter().sum::<f64>() + t.busy_s;
    assert!((sum - t.wall_s).abs() < 1e-12);
}

#[test]
fn state_changes_inside_a_period_are_exact() {
    // Two periods; the feeder switches state mid-period.
    let t = run(
        Allocation::Priority,
        &[(0, ON), (30, STO), (130, ON), (150, OTH)],
        &idle_workers(200),
        &[sample(0, 100, 0.0), sample(100, 200, 0.0)],
    );
    assert_eq!(causes_ms(&t), [100.0, 0.0, 50.0, 50.0]);
}

#[test]
fn streaming_waits_for_the_watermark() {
    let mut a = Attributor::new(AttributorConfig::default());
    a.push_feeder_event(0, STO);
    a.push_gpu_samples(0, &[sample(0, 100, 0.0), sample(100, 200, 0.0)]);
    assert_eq!(a.totals()[0].samples, 0, "no worker data yet");
    a.push_worker_slice(slice(0, 150, [0; 4]));
    assert_eq!(
        a.watermark_ns(),
        Some(0),
        "feeder watermark is its last event"
    );
    a.feeder_complete_until(150 * MS);
    assert_eq!(a.watermark_ns(), Some(150 * MS));
    assert_eq!(a.totals()[0].samples, 1);
    a.feeder_complete_until(300 * MS);
    assert_eq!(a.totals()[0].samples, 1, "workers only cover 150 ms");
    a.push_worker_slice(slice(150, 250, [0; 4]));
    let t = &a.totals()[0];
    assert_eq!(t.samples, 2);
    assert_eq!(causes_ms(t), [200.0, 0.0, 0.0, 0.0]);
}

#[test]
fn memory_is_bounded_and_stale_samples_are_forced() {
    let cfg = AttributorConfig {
        retention_ns: 1000 * MS,
        ..AttributorConfig::default()
    };
    let mut a = Attributor::new(cfg);
    // 100 s of 1 ms feeder flips and 100 ms worker slices, with no GPU samples.
    for i in 0..100_000u64 {
        a.push_feeder_event(i * MS, if i % 2 == 0 { ON } else { IPC });
        if i % 100 == 99 {
            a.push_worker_slice(slice(i - 99, i + 1, [50, 0, 0, 0]));
            a.feeder_complete_until((i + 1) * MS);
        }
    }
    let (f, w, g) = a.buffered();
    assert!(f <= 1002, "feeder events retained: {f}");
    assert!(w <= 11, "worker slices retained: {w}");
    assert_eq!(g, 0);

    // A GPU whose samples run ahead of a stalled watermark: only the last retention's worth
    // stays queued.
    let samples: Vec<UtilSample> = (0..1000)
        .map(|i| sample(100_000 + i * 10, 100_010 + i * 10, 0.5))
        .collect();
    a.push_gpu_samples(3, &samples);
    let (_, _, g) = a.buffered();
    assert!(g <= 101, "queued samples: {g}");
    a.flush();
    let t = &a.totals()[0];
    assert_eq!(t.gpu, 3);
    assert_eq!(t.samples, 1000);
    assert_eq!(a.buffered().2, 0);
}

#[test]
fn bad_samples_are_dropped_or_clipped() {
    let mut a = Attributor::new(AttributorConfig::default());
    a.push_feeder_event(0, ON);
    a.push_gpu_samples(
        1,
        &[
            sample(0, 100, f64::NAN),
            UtilSample {
                end_ns: 5,
                period_ns: 0,
                util: 0.5,
            },
            sample(0, 100, 2.0),  // clamped to 1
            sample(50, 150, 0.0), // clipped to 100..150
            sample(20, 80, 0.0),  // entirely before: dropped
            UtilSample {
                end_ns: 200 * MS,
                period_ns: u64::MAX, // starts at 0: clipped to 150..200
                util: 0.0,
            },
        ],
    );
    a.flush();
    let t = &a.totals()[0];
    assert_eq!(t.dropped_samples, 3);
    assert_eq!(t.samples, 3);
    assert_eq!(ms(t.wall_s), 200.0);
    assert_eq!(ms(t.busy_s), 100.0);
    assert_eq!(causes_ms(t), [0.0, 0.0, 100.0, 0.0]);
}

#[test]
fn empty_push_registers_a_gpu() {
    let mut a = Attributor::new(AttributorConfig::default());
    a.push_gpu_samples(5, &[]);
    assert_eq!(
        a.totals(),
        vec![GpuTotals {
            gpu: 5,
            ..GpuTotals::default()
        }]
    );
}

#[test]
fn out_of_order_and_repeated_events_are_tolerated() {
    let mut a = Attributor::new(AttributorConfig::default());
    a.push_feeder_event(10 * MS, ON);
    a.push_feeder_event(10 * MS, ON);
    a.push_feeder_event(50 * MS, STO);
    a.push_feeder_event(40 * MS, OTH); // late: moved to 50 ms, replaces STO there
    a.push_feeder_event(50 * MS, ON); // back to ON at the same instant: merged away
    a.push_feeder_event(90 * MS, IPC);
    assert_eq!(a.buffered().0, 2);
    // Overlapping worker slice is clipped and pro-rated.
    a.push_worker_slice(slice(0, 100, [0; 4]));
    a.push_worker_slice(slice(50, 150, [0, 100, 0, 0]));
    a.push_gpu_samples(0, &[sample(0, 100, 0.0)]);
    a.flush();
    // 0..10 unknown, 10..90 on CPU, 90..100 ipc with no worker activity in 0..100.
    assert_eq!(causes_ms(&a.totals()[0]), [0.0, 0.0, 80.0, 20.0]);
}

// ---- property tests ----

/// A generated scenario (times in ns from an arbitrary base).
#[derive(Clone, Debug)]
struct Scenario {
    feeder: Vec<(u64, u32)>,
    workers: Vec<WorkerSlice>,
    gpus: Vec<Vec<UtilSample>>,
}

const BASE: u64 = 5_000_000_000;

fn scenario() -> impl Strategy<Value = Scenario> {
    let feeder = prop::collection::vec(
        (
            0u64..40 * MS,
            prop_oneof![4 => 0u32..NUM_STATES as u32, 1 => Just(STATE_UNKNOWN)],
        ),
        0..80,
    );
    let workers = prop::collection::vec(
        (
            1u64..200 * MS,
            prop_oneof![8 => Just(0u64), 1 => 0u64..100 * MS],
            prop::array::uniform5(0u64..600 * MS),
        ),
        0..40,
    );
    let gpu = prop::collection::vec(
        (
            1u64..300 * MS,
            prop_oneof![6 => Just(0u64), 1 => 0u64..200 * MS],
            prop_oneof![3 => 0.0f64..=1.0, 1 => Just(0.0), 1 => Just(1.0)],
        ),
        0..40,
    );
    (feeder, workers, prop::collection::vec(gpu, 1..4)).prop_map(|(f, w, g)| {
        let mut t = BASE;
        let feeder = f
            .into_iter()
            .map(|(dt, s)| {
                t += dt;
                (t, s)
            })
            .collect();
        let mut t = BASE - 100 * MS;
        let workers = w
            .into_iter()
            .map(|(len, gap, st)| {
                let start = t + gap;
                t = start + len;
                WorkerSlice {
                    start_ns: start,
                    end_ns: t,
                    state_ns: st,
                }
            })
            .collect();
        let gpus = g
            .into_iter()
            .map(|samples| {
                let mut t = BASE - 50 * MS;
                samples
                    .into_iter()
                    .map(|(period, gap, util)| {
                        t += gap + period;
                        UtilSample {
                            end_ns: t,
                            period_ns: period,
                            util,
                        }
                    })
                    .collect()
            })
            .collect();
        Scenario {
            feeder,
            workers,
            gpus,
        }
    })
}

/// Pushes everything in arrival order: feeder events at their time, worker slices at their
/// end, GPU samples `lag` after their end; then flushes.
fn stream(sc: &Scenario, cfg: AttributorConfig, lag: u64) -> Attributor {
    enum Item<'a> {
        Feeder(u64, u32),
        Worker(WorkerSlice),
        Gpu(u32, &'a UtilSample),
    }
    let mut items: Vec<(u64, usize, Item)> = Vec::new();
    for &(t, s) in &sc.feeder {
        items.push((t, 0, Item::Feeder(t, s)));
    }
    for &w in &sc.workers {
        items.push((w.end_ns, 1, Item::Worker(w)));
    }
    for (g, samples) in sc.gpus.iter().enumerate() {
        for s in samples {
            items.push((s.end_ns + lag, 2, Item::Gpu(g as u32, s)));
        }
    }
    items.sort_by_key(|&(t, k, _)| (t, k));
    let mut a = Attributor::new(cfg);
    for g in 0..sc.gpus.len() {
        a.push_gpu_samples(g as u32, &[]); // a job GPU is known before its first sample
    }
    for (t, _, item) in items {
        match item {
            Item::Feeder(ts, s) => a.push_feeder_event(ts, s),
            Item::Worker(w) => {
                a.feeder_complete_until(t);
                a.push_worker_slice(w);
            }
            Item::Gpu(g, s) => a.push_gpu_samples(g, std::slice::from_ref(s)),
        }
    }
    a.flush();
    a
}

/// Everything up front, then the samples, then flush.
fn batch(sc: &Scenario, cfg: AttributorConfig) -> Attributor {
    let mut a = Attributor::new(cfg);
    for &(t, s) in &sc.feeder {
        a.push_feeder_event(t, s);
    }
    for &w in &sc.workers {
        a.push_worker_slice(w);
    }
    for (g, samples) in sc.gpus.iter().enumerate() {
        a.push_gpu_samples(g as u32, samples);
    }
    a.flush();
    a
}

fn check_invariants(totals: &[GpuTotals]) -> Result<(), TestCaseError> {
    for t in totals {
        let idle = t.idle_total_s();
        let tol = 1e-9 * t.wall_s.max(1e-9);
        prop_assert!(
            (t.busy_s + idle - t.wall_s).abs() <= tol,
            "conservation: {t:?}"
        );
        prop_assert!(t.busy_s >= 0.0 && t.busy_s <= t.wall_s + tol, "{t:?}");
        for &c in &t.idle_s {
            prop_assert!(c >= 0.0, "negative cause: {t:?}");
            prop_assert!(c <= idle + tol, "cause exceeds idle: {t:?}");
        }
        prop_assert!(t.io_feeder_s >= 0.0 && t.io_feeder_s <= t.idle_s[CAUSE_IO] + tol);
    }
    Ok(())
}

fn assert_close(a: &[GpuTotals], b: &[GpuTotals]) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let tol = 1e-9 * x.wall_s.max(1e-9);
        prop_assert_eq!(x.gpu, y.gpu);
        prop_assert_eq!(x.samples, y.samples);
        prop_assert!((x.wall_s - y.wall_s).abs() <= tol && (x.busy_s - y.busy_s).abs() <= tol);
        for (c, d) in x.idle_s.iter().zip(&y.idle_s) {
            prop_assert!((c - d).abs() <= tol, "{x:?} vs {y:?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None, // no regression files in the source tree
        ..ProptestConfig::default()
    })]

    #[test]
    fn conservation_holds(sc in scenario(), proportional in any::<bool>(), retention in prop_oneof![Just(DEFAULT_RETENTION_NS), 50 * MS..2000 * MS]) {
        let allocation = if proportional { Allocation::Proportional } else { Allocation::Priority };
        let cfg = AttributorConfig { allocation, retention_ns: retention };
        for a in [stream(&sc, cfg, 300 * MS), batch(&sc, cfg)] {
            let totals = a.totals();
            check_invariants(&totals)?;
            let accepted: u64 = totals.iter().map(|t| t.samples + t.dropped_samples).sum();
            prop_assert_eq!(accepted, sc.gpus.iter().map(|g| g.len() as u64).sum::<u64>());
        }
    }

    #[test]
    fn streaming_equals_batch(sc in scenario(), proportional in any::<bool>(), lag in 0u64..2000 * MS) {
        let allocation = if proportional { Allocation::Proportional } else { Allocation::Priority };
        let cfg = AttributorConfig { allocation, retention_ns: u64::MAX / 4 };
        assert_close(&stream(&sc, cfg, lag).totals(), &batch(&sc, cfg).totals())?;
    }

    #[test]
    fn priority_never_exceeds_feeder_time(sc in scenario()) {
        // Per period: each cause is at most the feeder time classified into it.
        let a = batch(&sc, AttributorConfig::default());
        for samples in &sc.gpus {
            let mut last = 0;
            for s in samples {
                let t0 = s.start_ns().max(last);
                if s.end_ns <= t0 { continue; }
                last = s.end_ns;
                let raw = a.timeline.classify(t0, s.end_ns);
                let period = (s.end_ns - t0) as f64;
                let sum = raw.io_feeder + raw.io_workers + raw.preprocess + raw.host + raw.other;
                prop_assert!((sum - period).abs() <= 1e-6 * period.max(1.0), "{raw:?} vs {period}");
                let idle = period * (1.0 - s.util);
                let (c, _) = allocate(raw, idle, Allocation::Priority);
                let eps = 1e-9 * period;
                prop_assert!(c[CAUSE_IO] <= raw.io_feeder + raw.io_workers + eps);
                prop_assert!(c[CAUSE_PREPROCESS] <= raw.preprocess + eps);
                prop_assert!(c[CAUSE_HOST] <= raw.host + eps);
                prop_assert!(c[CAUSE_OTHER] <= raw.other + eps);
                prop_assert!((c.iter().sum::<f64>() - idle).abs() <= eps);
            }
        }
    }
}
