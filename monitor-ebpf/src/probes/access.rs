//! Reads of kernel structs. Pointers that the kernel hands to a BTF tracepoint (and the ones
//! loaded from their members) are typed: the verifier knows their BTF type, checks each access
//! against the running kernel's layout and turns it into a fault-safe load, with no helper call.
//! The offsets come from `CONFIG` (BTF, resolved by user space), which the verifier sees as
//! constants. Only the fd table, an array of pointers, needs `bpf_probe_read_kernel`.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use monitor_common::abi;

use super::maps::kcfg;

/// A member of a typed kernel struct: `*(base + off)`.
#[inline(always)]
pub fn field<T: Copy>(base: *const u8, off: u32) -> T {
    unsafe { core::ptr::read_volatile(base.add(off as usize) as *const T) }
}

/// `task->tgid` and `task->pid`.
#[inline(always)]
pub fn task_ids(task: *const u8) -> (u32, u32) {
    (field(task, kcfg!(task_tgid)), field(task, kcfg!(task_pid)))
}

/// Whether `task` sleeps in `io_schedule()` (direct I/O, page-cache misses, mmap page faults).
#[inline(always)]
pub fn in_iowait(task: *const u8) -> bool {
    let b: u8 = field(task, kcfg!(task_in_iowait_byte));
    (b as u32) & kcfg!(task_in_iowait_mask) != 0
}

/// An untyped kernel read (for what BTF cannot type).
#[inline(always)]
fn probe<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// What `fd` of `task` refers to: task->files->fdt->fd[fd]->f_inode->i_mode.
#[inline(always)]
pub fn fd_kind(task: *const u8, fd: u64) -> u32 {
    let files: *const u8 = field(task, kcfg!(task_files));
    if files.is_null() {
        return monitor_common::FD_OTHER;
    }
    let fdt: *const u8 = field(files, kcfg!(files_fdt));
    if fdt.is_null() {
        return monitor_common::FD_OTHER;
    }
    let max_fds: u32 = field(fdt, kcfg!(fdtable_max_fds));
    if fd >= max_fds as u64 {
        return monitor_common::FD_OTHER;
    }
    // `struct file **fd`: a pointer to pointers, which BTF gives as a plain number.
    let fds: u64 = field(fdt, kcfg!(fdtable_fd));
    let Some(file) = probe::<u64>(fds + fd * 8) else {
        return monitor_common::FD_OTHER;
    };
    let Some(inode) = probe::<u64>(file + kcfg!(file_inode) as u64) else {
        return monitor_common::FD_OTHER;
    };
    let Some(mode) = probe::<u16>(inode + kcfg!(inode_mode) as u64) else {
        return monitor_common::FD_OTHER;
    };
    abi::fd_kind_of_mode(mode)
}
