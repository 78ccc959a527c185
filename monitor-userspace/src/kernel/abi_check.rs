//! The ABI constants of `monitor_common::abi` checked against the running kernel: a thread
//! blocked in each call must show that number in `/proc/self/task/TID/syscall` (the kernel's
//! own view of the syscall a task sleeps in), and against the C library's numbers.
use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use monitor_common::abi::{self, nr};

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() }
}

/// The syscall number a thread running `f` sleeps in.
fn blocked_in(f: impl FnOnce() + Send + 'static) -> u64 {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        f();
    });
    let tid = rx.recv().unwrap();
    let path = format!("/proc/self/task/{tid}/syscall");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = String::new();
    while Instant::now() < deadline {
        seen = std::fs::read_to_string(&path).unwrap_or_default();
        let stat =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        let sleeping = stat
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('S'));
        if sleeping && let Some(n) = seen.split_whitespace().next().and_then(|n| n.parse().ok()) {
            drop(handle); // the call times out or is woken by the caller
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("thread never blocked: {path} says {seen:?}");
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

#[test]
fn syscall_numbers_match_the_running_kernel() {
    let ms = 1500;
    let (r, w) = pipe();
    assert_eq!(
        blocked_in(move || {
            let mut b = [0u8; 1];
            // SAFETY: valid buffer.
            unsafe { libc::read(r, b.as_mut_ptr().cast(), 1) };
        }),
        nr::READ
    );
    // SAFETY: wakes the reader.
    unsafe { libc::write(w, b"x".as_ptr().cast(), 1) };
    let (r2, w2) = pipe();
    assert_eq!(
        blocked_in(move || {
            let mut b = [0u8; 1];
            let iov = libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 1,
            };
            // SAFETY: valid iovec.
            unsafe { libc::readv(r2, &iov, 1) };
        }),
        nr::READV
    );
    // SAFETY: wakes the reader.
    unsafe { libc::write(w2, b"x".as_ptr().cast(), 1) };
    assert_eq!(
        blocked_in(move || {
            // SAFETY: no fds, timeout only.
            unsafe { libc::poll(std::ptr::null_mut(), 0, ms) };
        }),
        nr::POLL
    );
    assert_eq!(
        blocked_in(move || {
            let ts = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            // SAFETY: no fds.
            unsafe { libc::ppoll(std::ptr::null_mut(), 0, &ts, std::ptr::null()) };
        }),
        nr::PPOLL
    );
    assert_eq!(
        blocked_in(move || {
            let mut tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            // SAFETY: no fd sets.
            unsafe {
                libc::syscall(
                    libc::SYS_select,
                    0,
                    std::ptr::null_mut::<libc::fd_set>(),
                    std::ptr::null_mut::<libc::fd_set>(),
                    std::ptr::null_mut::<libc::fd_set>(),
                    &mut tv,
                )
            };
        }),
        nr::SELECT
    );
    assert_eq!(
        blocked_in(move || {
            // SAFETY: a fresh epoll fd, no events wanted.
            unsafe {
                let ep = libc::epoll_create1(0);
                let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 1];
                libc::syscall(libc::SYS_epoll_wait, ep, ev.as_mut_ptr(), 1, ms);
                libc::close(ep);
            }
        }),
        nr::EPOLL_WAIT
    );
    assert_eq!(
        blocked_in(move || {
            let word = 0u32;
            let ts = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            // SAFETY: a private futex word that nobody wakes; the timeout ends the wait.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    &word as *const u32,
                    libc::FUTEX_WAIT,
                    0,
                    &ts as *const libc::timespec,
                )
            };
        }),
        nr::FUTEX
    );
    let mut sv = [0; 2];
    // SAFETY: valid array.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) },
        0
    );
    let s0 = sv[0];
    assert_eq!(
        blocked_in(move || {
            let mut b = [0u8; 1];
            // SAFETY: valid buffer.
            unsafe {
                libc::recvfrom(
                    s0,
                    b.as_mut_ptr().cast(),
                    1,
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }),
        nr::RECVFROM
    );
    // SAFETY: wakes the receiver.
    unsafe { libc::write(sv[1], b"x".as_ptr().cast(), 1) };
    let mut child = std::process::Command::new("sleep")
        .arg("1")
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    assert_eq!(
        blocked_in(move || {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }),
        nr::WAIT4
    );
    let _ = child.wait();
}

#[test]
fn constants_match_the_c_library() {
    let pairs: &[(u64, libc::c_long)] = &[
        (nr::READ, libc::SYS_read),
        (nr::POLL, libc::SYS_poll),
        (nr::PREAD64, libc::SYS_pread64),
        (nr::READV, libc::SYS_readv),
        (nr::SELECT, libc::SYS_select),
        (nr::PAUSE, libc::SYS_pause),
        (nr::RECVFROM, libc::SYS_recvfrom),
        (nr::RECVMSG, libc::SYS_recvmsg),
        (nr::WAIT4, libc::SYS_wait4),
        (nr::SEMOP, libc::SYS_semop),
        (nr::MSGRCV, libc::SYS_msgrcv),
        (nr::RT_SIGTIMEDWAIT, libc::SYS_rt_sigtimedwait),
        (nr::RT_SIGSUSPEND, libc::SYS_rt_sigsuspend),
        (nr::FUTEX, libc::SYS_futex),
        (nr::SEMTIMEDOP, libc::SYS_semtimedop),
        (nr::EPOLL_WAIT, libc::SYS_epoll_wait),
        (nr::MQ_TIMEDRECEIVE, libc::SYS_mq_timedreceive),
        (nr::WAITID, libc::SYS_waitid),
        (nr::PSELECT6, libc::SYS_pselect6),
        (nr::PPOLL, libc::SYS_ppoll),
        (nr::EPOLL_PWAIT, libc::SYS_epoll_pwait),
        (nr::PREADV, libc::SYS_preadv),
        (nr::RECVMMSG, libc::SYS_recvmmsg),
        (nr::PREADV2, libc::SYS_preadv2),
        (nr::EPOLL_PWAIT2, libc::SYS_epoll_pwait2),
        (nr::FUTEX_WAITV, libc::SYS_futex_waitv),
    ];
    for &(ours, c) in pairs {
        assert_eq!(ours, c as u64);
    }
    assert!(abi::is_read_family(nr::PREADV2) && !abi::is_read_family(nr::POLL));
    assert!(abi::is_ipc_wait(nr::FUTEX) && !abi::is_ipc_wait(nr::READ));
    assert!(abi::is_child_wait(nr::WAIT4));
    assert_eq!(abi::S_IFMT as u32, libc::S_IFMT);
    assert_eq!(abi::S_IFREG as u32, libc::S_IFREG);
    assert_eq!(abi::S_IFBLK as u32, libc::S_IFBLK);
    assert_eq!(abi::S_IFIFO as u32, libc::S_IFIFO);
    assert_eq!(abi::S_IFSOCK as u32, libc::S_IFSOCK);
}

#[test]
fn file_modes_of_real_files() {
    use std::os::unix::fs::MetadataExt;
    let kind = |p: &str| abi::fd_kind_of_mode(std::fs::metadata(p).unwrap().mode() as u16);
    assert_eq!(kind("/proc/self/exe"), monitor_common::FD_FILE);
    assert_eq!(kind("/dev/null"), monitor_common::FD_OTHER);
    let (r, _w) = pipe();
    assert_eq!(kind(&format!("/proc/self/fd/{r}")), monitor_common::FD_IPC);
}
