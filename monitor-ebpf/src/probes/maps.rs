//! Every map of the kernel programs and their configuration. Fixed sizes; every failed insert,
//! collision or failed read is counted in [`DROPS`].
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type, task_struct},
    helpers::generated::bpf_task_storage_get,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use monitor_common::*;

/// Filled in by user space at load time (struct offsets and enum values from BTF).
#[unsafe(no_mangle)]
pub static CONFIG: Config = Config {
    offsets: KernelOffsets {
        task_pid: 0,
        task_tgid: 0,
        task_files: 0,
        task_in_iowait_byte: 0,
        task_in_iowait_mask: 0,
        task_signal: 0,
        task_start_time: 0,
        task_ioac: 0,
        signal_live: 0,
        ioac_rchar: 0,
        ioac_syscr: 0,
        ioac_read_bytes: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_inode: 0,
        inode_mode: 0,
        rq_cmd_flags: 0,
        rq_data_len: 0,
        rq_q: 0,
        rq_start_time_ns: 0,
        rq_rq_flags: 0,
        rq_io_start_time_ns: 0,
        rqf_stats: 0,
        queue_disk: 0,
        disk_major: 0,
        disk_first_minor: 0,
        regs_orig_ax: 0,
        regs_di: 0,
        regs_ax: 0,
        _pad2: 0,
        req_op_mask: 0,
        req_op_read: 0,
        req_op_write: 0,
        req_op_flush: 0,
        req_op_discard: 0,
        req_op_drv_in: 0,
        req_op_drv_out: 0,
        has_ioac: 0,
        _pad: 0,
    },
};

/// One configuration value. Volatile: the value is patched into the frozen, read-only `.rodata`
/// at load time, so the compiler must not fold it, and the verifier then knows it as a constant
/// (which is what lets typed struct accesses use it as an offset).
macro_rules! kcfg {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::probes::maps::CONFIG.offsets.$field) }
    };
}
pub(crate) use kcfg;

/// Tracked processes, indexed by pid: `tracked_value(slot, role)`, 0 = untracked. The verifier
/// inlines array lookups, so the early exit of an untracked task costs no helper call. User
/// space sizes it to the kernel's pid_max at load time.
#[map]
pub static TRACKED: Array<u32> = Array::with_max_entries(DEFAULT_PID_SLOTS, 0);
/// Per rank slot: which thread is the feeder (written by user space).
#[map]
pub static SLOT_CONF: Array<SlotConf> = Array::with_max_entries(DEFAULT_SLOTS, 0);
/// Tracked processes, by tgid (per-process counters for the record file).
#[map]
pub static PROCS: HashMap<u32, ProcInfo> = HashMap::with_max_entries(MAX_PROCS, 0);
/// Per slot and role: state time and submitted block I/O, per CPU.
#[map]
pub static SLOT_STATS: PerCpuArray<SlotStats> =
    PerCpuArray::with_max_entries(DEFAULT_SLOTS * NUM_ROLES as u32, 0);
/// Per slot and role: threads in each state now (see `OpenIntervals`), per CPU (plain adds;
/// only the wrapping sum over CPUs means anything).
#[map]
pub static OPEN: PerCpuArray<OpenIntervals> =
    PerCpuArray::with_max_entries(DEFAULT_SLOTS * NUM_ROLES as u32, 0);
/// Per slot, role and fd kind: sleeps inside read-family calls.
#[map]
pub static STALLS: Array<StallStats> =
    Array::with_max_entries(DEFAULT_SLOTS * (NUM_ROLES * NUM_FD_KINDS) as u32, 0);
/// `--syscalls` only (one entry otherwise): completed read calls per slot, role and fd kind.
#[map]
pub static READS: PerCpuArray<ReadStats> =
    PerCpuArray::with_max_entries(DEFAULT_SLOTS * (NUM_ROLES * NUM_FD_KINDS) as u32, 0);
/// Block requests in flight, direct-mapped by a hash of the `struct request *` (no hash-map
/// insert and delete per request; a slot taken by another live request is counted as a
/// collision and overwritten).
#[map]
pub static INFLIGHT: Array<Inflight> = Array::with_max_entries(MAX_INFLIGHT, 0);
/// Device numbers of the device slots (0 = free), direct-mapped with linear probing.
#[map]
pub static BLOCK_DEVS: Array<u32> = Array::with_max_entries(MAX_DEVS, 0);
/// Per device slot: 1 while the device's last completed request carried the block layer's own
/// issue time (`RQF_STATS`), so that its issues need no `INFLIGHT` entry.
#[map]
pub static DEV_TIMED: Array<u32> = Array::with_max_entries(MAX_DEVS, 0);
/// Per device slot and operation, per CPU.
#[map]
pub static BLOCK_STATS: PerCpuArray<BlockStats> =
    PerCpuArray::with_max_entries(MAX_DEVS * NUM_OPS as u32, 0);
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_DROPS as u32, 0);
/// Feeder threads' state changes and job processes' exec/exit (`Event`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RINGBUF_BYTES, 0);

/// A BTF-defined task-storage map (aya-ebpf has no wrapper for this type): per-thread state
/// that lives and dies with the `task_struct`, found in O(1) from the task pointer.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The value of `task` (a BTF task pointer), created zeroed if `create`. None when absent or
    /// when the kernel refuses (nested use on this CPU, out of memory).
    #[inline(always)]
    pub fn get(&self, task: *const u8, create: bool) -> Option<*mut T> {
        let flags = if create {
            BPF_LOCAL_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        let p = unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                task as *mut task_struct,
                core::ptr::null_mut(),
                flags,
            )
        };
        if p.is_null() { None } else { Some(p.cast()) }
    }
}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "TASKS")]
pub static TASKS: TaskStorage<TaskState> = TaskStorage::new();

#[inline(always)]
pub fn drop_event(reason: u32) {
    if let Some(c) = DROPS.get_ptr_mut(reason) {
        unsafe { *c += 1 };
    }
}

/// `TRACKED` value of process `tgid` (0 = untracked): one inlined array lookup.
#[inline(always)]
pub fn tracked(tgid: u32) -> u32 {
    match TRACKED.get(tgid) {
        Some(v) => *v,
        None => 0,
    }
}

#[inline(always)]
pub fn set_tracked(tgid: u32, value: u32) {
    match TRACKED.get_ptr_mut(tgid) {
        Some(v) => unsafe { *v = value },
        None => drop_event(DROP_PID_OUT_OF_RANGE),
    }
}

/// Whether a `TRACKED` value is an accounted role (feeder or worker).
#[inline(always)]
pub fn accounted(value: u32) -> bool {
    value != 0 && tracked_parts(value).1 != ROLE_LAUNCHER
}

#[inline(always)]
pub fn emit(ev: &Event) {
    if EVENTS.output(ev, 0).is_err() {
        drop_event(DROP_RINGBUF_FULL);
    }
}
