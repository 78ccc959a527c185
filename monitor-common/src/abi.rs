//! Kernel ABI constants that BTF does not describe: x86-64 syscall numbers, file-type bits and
//! the one task state the programs test. Struct offsets, the block layer's `enum req_op` and the
//! width of its operation field *are* in BTF and are resolved at load time instead
//! (`monitor-userspace/src/kernel/offsets.rs`). User space checks these numbers against the
//! running kernel in its tests (`kernel::abi_check`): a thread blocked in each call must show
//! that number in `/proc/PID/task/TID/syscall`.

/// x86-64 syscall numbers, from the kernel's `arch/x86/entry/syscalls/syscall_64.tbl` (stable
/// ABI: numbers are never reused).
pub mod nr {
    pub const READ: u64 = 0;
    pub const POLL: u64 = 7;
    pub const PREAD64: u64 = 17;
    pub const READV: u64 = 19;
    pub const SELECT: u64 = 23;
    pub const PAUSE: u64 = 34;
    pub const RECVFROM: u64 = 45;
    pub const RECVMSG: u64 = 47;
    pub const WAIT4: u64 = 61;
    pub const SEMOP: u64 = 65;
    pub const MSGRCV: u64 = 70;
    pub const RT_SIGTIMEDWAIT: u64 = 128;
    pub const RT_SIGSUSPEND: u64 = 130;
    pub const FUTEX: u64 = 202;
    pub const SEMTIMEDOP: u64 = 220;
    pub const EPOLL_WAIT: u64 = 232;
    pub const MQ_TIMEDRECEIVE: u64 = 243;
    pub const WAITID: u64 = 247;
    pub const PSELECT6: u64 = 270;
    pub const PPOLL: u64 = 271;
    pub const EPOLL_PWAIT: u64 = 281;
    pub const PREADV: u64 = 295;
    pub const RECVMMSG: u64 = 299;
    pub const PREADV2: u64 = 327;
    pub const EPOLL_PWAIT2: u64 = 441;
    pub const FUTEX_WAITV: u64 = 449;
    /// futex_wait(2), Linux 6.7 and later.
    pub const FUTEX_WAIT: u64 = 455;
}

/// `pt_regs.ax` of a thread inside a syscall: the x86-64 entry code stores `-ENOSYS` there
/// (`PUSH_AND_CLEAR_REGS rax=$-ENOSYS`, and FRED's entry likewise) and the return value
/// replaces it only when the call returns.
pub const ENOSYS_RET: u64 = (-38i64) as u64;

/// The read family, whose sleeps are read stalls: read, pread64, readv, preadv, preadv2.
#[inline(always)]
pub fn is_read_family(n: u64) -> bool {
    matches!(
        n,
        nr::READ | nr::PREAD64 | nr::READV | nr::PREADV | nr::PREADV2
    )
}

/// Calls that wait for another process or thread (the DataLoader's result queue lives behind
/// these): poll/select/epoll, futexes, socket receives, System V and POSIX message queues,
/// semaphores.
#[inline(always)]
pub fn is_ipc_wait(n: u64) -> bool {
    matches!(
        n,
        nr::POLL
            | nr::SELECT
            | nr::RECVFROM
            | nr::RECVMSG
            | nr::SEMOP
            | nr::MSGRCV
            | nr::FUTEX
            | nr::SEMTIMEDOP
            | nr::EPOLL_WAIT
            | nr::MQ_TIMEDRECEIVE
            | nr::PSELECT6
            | nr::PPOLL
            | nr::EPOLL_PWAIT
            | nr::RECVMMSG
            | nr::EPOLL_PWAIT2
            | nr::FUTEX_WAITV
            | nr::FUTEX_WAIT
    )
}

/// Calls in which a process merely waits for a child or a signal (a shell running its command,
/// `timeout`): user space uses these to see through wrappers when it looks for a job's feeder.
pub fn is_child_wait(n: u64) -> bool {
    matches!(
        n,
        nr::WAIT4 | nr::WAITID | nr::RT_SIGSUSPEND | nr::RT_SIGTIMEDWAIT | nr::PAUSE
    )
}

/// File-type bits of `i_mode` (`include/uapi/linux/stat.h`, the same values as POSIX `S_IF*`).
pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFIFO: u16 = 0o010000;

/// fd kind (`FD_*`) of an inode mode.
#[inline(always)]
pub fn fd_kind_of_mode(mode: u16) -> u32 {
    match mode & S_IFMT {
        S_IFREG | S_IFBLK => crate::FD_FILE,
        S_IFIFO | S_IFSOCK => crate::FD_IPC,
        _ => crate::FD_OTHER,
    }
}

/// `TASK_RUNNING` (`include/linux/sched.h`): a `prev_state` of 0 at `sched_switch` means the task
/// was preempted or yielded, still runnable: it waits for a CPU, not for data.
pub const TASK_RUNNING: u32 = 0;
