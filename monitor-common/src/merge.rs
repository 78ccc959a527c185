//! What user space does with the wire types: `aya::Pod` for map access, summing per-CPU values,
//! splitting device numbers.
use crate::wire::*;

// SAFETY: all of these are repr(C) plain data of u32/u64 fields laid out without implicit padding
// (explicit `_pad` members where needed) and no pointers; any bit pattern is valid.
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for SlotConf {}
unsafe impl aya::Pod for ProcInfo {}
unsafe impl aya::Pod for TaskState {}
unsafe impl aya::Pod for SlotStats {}
unsafe impl aya::Pod for OpenIntervals {}
unsafe impl aya::Pod for StallStats {}
unsafe impl aya::Pod for ReadStats {}
unsafe impl aya::Pod for Inflight {}
unsafe impl aya::Pod for BlockStats {}
unsafe impl aya::Pod for Event {}

/// Values that add up across CPUs.
pub trait Accumulate: Copy + Default {
    fn accumulate(&mut self, other: &Self);

    /// The sum of per-CPU values.
    fn sum<'a>(values: impl IntoIterator<Item = &'a Self>) -> Self
    where
        Self: 'a,
    {
        let mut acc = Self::default();
        for v in values {
            acc.accumulate(v);
        }
        acc
    }
}

fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y);
    }
}

impl Accumulate for SlotStats {
    fn accumulate(&mut self, o: &Self) {
        add(&mut self.state_ns, &o.state_ns);
        self.blk_count = self.blk_count.wrapping_add(o.blk_count);
        self.blk_bytes = self.blk_bytes.wrapping_add(o.blk_bytes);
    }
}

impl Accumulate for ReadStats {
    fn accumulate(&mut self, o: &Self) {
        self.count = self.count.wrapping_add(o.count);
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.errors = self.errors.wrapping_add(o.errors);
        self.sum_ns = self.sum_ns.wrapping_add(o.sum_ns);
        add(&mut self.hist, &o.hist);
    }
}

impl Accumulate for StallStats {
    fn accumulate(&mut self, o: &Self) {
        self.count = self.count.wrapping_add(o.count);
        self.sum_ns = self.sum_ns.wrapping_add(o.sum_ns);
        add(&mut self.hist, &o.hist);
    }
}

impl Accumulate for BlockStats {
    fn accumulate(&mut self, o: &Self) {
        self.count = self.count.wrapping_add(o.count);
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.errors = self.errors.wrapping_add(o.errors);
        self.lat_count = self.lat_count.wrapping_add(o.lat_count);
        self.lat_sum_ns = self.lat_sum_ns.wrapping_add(o.lat_sum_ns);
        self.queue_count = self.queue_count.wrapping_add(o.queue_count);
        self.queue_sum_ns = self.queue_sum_ns.wrapping_add(o.queue_sum_ns);
        add(&mut self.job_count, &o.job_count);
        add(&mut self.job_bytes, &o.job_bytes);
        add(&mut self.lat_hist, &o.lat_hist);
        add(&mut self.queue_hist, &o.queue_hist);
    }
}

/// Per-CPU pieces of the open intervals: a thread enters a state on one CPU and leaves it on
/// another, so single CPUs' values wrap below zero; only the wrapping sum means anything.
impl Accumulate for OpenIntervals {
    fn accumulate(&mut self, o: &Self) {
        add(&mut self.count, &o.count);
        add(&mut self.since_sum, &o.since_sum);
    }
}

impl Accumulate for u64 {
    fn accumulate(&mut self, o: &Self) {
        *self = self.wrapping_add(*o);
    }
}

/// `(major, minor)` of a kernel `dev_t` (the inverse of [`crate::mkdev`]).
pub const fn dev_parts(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xfffff)
}

impl OpenIntervals {
    /// Time spent so far, at `now`, by the threads currently in each state.
    pub fn open_ns(&self, now: u64) -> [u64; crate::NUM_STATES] {
        core::array::from_fn(|s| {
            // open = n * now - sum(since); wrapping because the kernel subtracts by adding.
            let open = self.count[s]
                .wrapping_mul(now)
                .wrapping_sub(self.since_sum[s]) as i64;
            open.max(0) as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_intervals_sum_across_cpus() {
        // Thread A enters state 1 at t=100 on CPU 0; at t=250 on CPU 1 it closes its interval
        // (since += 150) and leaves (count -= 1, since -= 250). Thread B enters state 1 at
        // t=200 on CPU 1.
        let n = |v: u64| v.wrapping_neg();
        let mut cpu0 = OpenIntervals::default();
        let mut cpu1 = OpenIntervals::default();
        cpu0.count[1] = 1;
        cpu0.since_sum[1] = 100;
        cpu1.count[1] = n(1).wrapping_add(1);
        cpu1.since_sum[1] = 150u64.wrapping_add(n(250)).wrapping_add(200);
        let sum = OpenIntervals::sum([&cpu0, &cpu1]);
        assert_eq!(sum.count[1], 1);
        // At t=300 only B is open, for 100 ns.
        assert_eq!(sum.open_ns(300)[1], 100);
    }

    #[test]
    fn per_cpu_values_add_up() {
        let mut a = SlotStats::default();
        a.state_ns[1] = 5;
        a.blk_bytes = 7;
        let s = SlotStats::sum([&a, &a, &SlotStats::default()]);
        assert_eq!(s.state_ns[1], 10);
        assert_eq!(s.blk_bytes, 14);
        let mut b = BlockStats::default();
        b.lat_hist[3] = 2;
        b.job_count[1] = 1;
        let s = BlockStats::sum([&b, &b]);
        assert_eq!((s.lat_hist[3], s.job_count[1]), (4, 2));
    }

    #[test]
    fn open_time_handles_wrapping_subtraction() {
        // One thread entered at 100 and one at 300: at 1000, 900 + 700 ns are open.
        let mut o = OpenIntervals::default();
        o.count[2] = 2;
        o.since_sum[2] = 400;
        assert_eq!(o.open_ns(1000)[2], 1600);
        // A thread left (subtracted by adding the two's complement).
        o.count[2] = o.count[2].wrapping_add(1u64.wrapping_neg());
        o.since_sum[2] = o.since_sum[2].wrapping_add(300u64.wrapping_neg());
        assert_eq!(o.open_ns(1000)[2], 900);
        assert_eq!(dev_parts(crate::mkdev(259, 3)), (259, 3));
    }
}
