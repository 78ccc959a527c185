//! Struct member offsets and enum values of the running kernel, read from its BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF has no CO-RE relocations, so the programs read kernel structs at offsets that user
//! space resolves here and passes in `Config`. A missing member is an error that names it, so a
//! kernel whose layout changed fails loudly at start instead of producing wrong numbers.
use std::path::PathBuf;

use btf_rs::{Btf, Type};
use monitor_common::KernelOffsets;

use super::KernelError;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where the kernel BTF is read from: `$STALLMON_BTF_PATH` (for tests of the error path), else
/// [`VMLINUX_BTF`].
pub fn btf_path() -> PathBuf {
    std::env::var_os("STALLMON_BTF_PATH")
        .map(Into::into)
        .unwrap_or_else(|| VMLINUX_BTF.into())
}

fn missing(what: String) -> KernelError {
    KernelError::Btf(what)
}

/// Offset of `member` in `struct name`, in bits (searching anonymous struct/union members too),
/// and its bitfield size if it is one.
fn member_bits(btf: &Btf, strukt: &str, member: &str) -> Result<(u32, Option<u32>), KernelError> {
    let types = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| missing(format!("struct {strukt} not found in kernel BTF")))?;
    for t in types {
        if let Type::Struct(s) = t
            && let Some(found) = find_member(btf, &s, member, 0)
        {
            return Ok(found);
        }
    }
    Err(missing(format!(
        "kernel BTF has no member {strukt}.{member}"
    )))
}

fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    member: &str,
    base: u32,
) -> Option<(u32, Option<u32>)> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            let bitfield = m.bitfield_size().filter(|&size| size != 0);
            return Some((base + m.bit_offset(), bitfield));
        }
        if name.is_empty() {
            // Anonymous struct or union: look inside.
            let mut ty = btf.resolve_chained_type(m).ok()?;
            loop {
                match ty {
                    Type::Struct(ref inner) | Type::Union(ref inner) => {
                        if let Some(found) = find_member(btf, inner, member, base + m.bit_offset())
                        {
                            return Some(found);
                        }
                        break;
                    }
                    Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) => {
                        let inner = ty.as_btf_type()?;
                        ty = btf.resolve_chained_type(inner).ok()?;
                    }
                    _ => break,
                }
            }
        }
    }
    None
}

fn byte_offset(btf: &Btf, strukt: &str, member: &str) -> Result<u32, KernelError> {
    let (bits, bitfield) = member_bits(btf, strukt, member)?;
    if bitfield.is_some() || bits % 8 != 0 {
        return Err(missing(format!(
            "{strukt}.{member} is a bitfield; expected a plain member"
        )));
    }
    Ok(bits / 8)
}

/// Value of `name` in `enum ename`.
fn enum_value(btf: &Btf, ename: &str, name: &str) -> Result<u32, KernelError> {
    let types = btf
        .resolve_types_by_name(ename)
        .map_err(|_| missing(format!("enum {ename} not found in kernel BTF")))?;
    for t in types {
        let found = match &t {
            Type::Enum(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == name))
                .map(|m| m.val()),
            Type::Enum64(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == name))
                .and_then(|m| u32::try_from(m.val()).ok()),
            _ => None,
        };
        if let Some(v) = found {
            return Ok(v);
        }
    }
    Err(missing(format!("kernel BTF has no {name} in enum {ename}")))
}

/// Resolves every offset and enum value the kernel programs need.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets, KernelError> {
    let (iowait_bits, _) = member_bits(btf, "task_struct", "in_iowait")?;
    // The operation occupies the low REQ_OP_BITS of cmd_flags; the flag bits start right after,
    // so the first value of `enum req_flag_bits` is REQ_OP_BITS.
    let op_bits = enum_value(btf, "req_flag_bits", "__REQ_FAILFAST_DEV")?;
    if op_bits == 0 || op_bits > 16 {
        return Err(missing(format!("implausible REQ_OP_BITS {op_bits}")));
    }
    // Per-task I/O accounting is optional (CONFIG_TASK_XACCT / CONFIG_TASK_IO_ACCOUNTING).
    let ioac = (|| -> Result<_, KernelError> {
        Ok((
            byte_offset(btf, "task_struct", "ioac")?,
            byte_offset(btf, "task_io_accounting", "rchar")?,
            byte_offset(btf, "task_io_accounting", "syscr")?,
            byte_offset(btf, "task_io_accounting", "read_bytes")?,
        ))
    })();
    let (task_ioac, ioac_rchar, ioac_syscr, ioac_read_bytes, has_ioac) = match ioac {
        Ok((a, c, d, e)) => (a, c, d, e, 1),
        Err(_) => (0, 0, 0, 0, 0),
    };
    // The block layer's own issue time (kernels whose BTF names the RQF_STATS bit; elsewhere
    // every request is timed by the programs, rqf_stats = 0).
    let kernel_timing = (|| -> Result<_, KernelError> {
        let bit = enum_value(btf, "rqf_flags", "__RQF_STATS")?;
        Ok((
            byte_offset(btf, "request", "rq_flags")?,
            byte_offset(btf, "request", "io_start_time_ns")?,
            if bit < 32 { 1u32 << bit } else { 0 },
        ))
    })();
    let (rq_rq_flags, rq_io_start_time_ns, rqf_stats) = kernel_timing.unwrap_or((0, 0, 0));
    Ok(KernelOffsets {
        task_pid: byte_offset(btf, "task_struct", "pid")?,
        task_tgid: byte_offset(btf, "task_struct", "tgid")?,
        task_files: byte_offset(btf, "task_struct", "files")?,
        task_in_iowait_byte: iowait_bits / 8,
        task_in_iowait_mask: 1 << (iowait_bits % 8),
        task_signal: byte_offset(btf, "task_struct", "signal")?,
        task_start_time: byte_offset(btf, "task_struct", "start_time")?,
        task_ioac,
        signal_live: byte_offset(btf, "signal_struct", "live")?,
        ioac_rchar,
        ioac_syscr,
        ioac_read_bytes,
        files_fdt: byte_offset(btf, "files_struct", "fdt")?,
        fdtable_max_fds: byte_offset(btf, "fdtable", "max_fds")?,
        fdtable_fd: byte_offset(btf, "fdtable", "fd")?,
        file_inode: byte_offset(btf, "file", "f_inode")?,
        inode_mode: byte_offset(btf, "inode", "i_mode")?,
        rq_cmd_flags: byte_offset(btf, "request", "cmd_flags")?,
        rq_data_len: byte_offset(btf, "request", "__data_len")?,
        rq_q: byte_offset(btf, "request", "q")?,
        rq_start_time_ns: byte_offset(btf, "request", "start_time_ns")?,
        rq_rq_flags,
        rq_io_start_time_ns,
        rqf_stats,
        queue_disk: byte_offset(btf, "request_queue", "disk")?,
        disk_major: byte_offset(btf, "gendisk", "major")?,
        disk_first_minor: byte_offset(btf, "gendisk", "first_minor")?,
        regs_orig_ax: byte_offset(btf, "pt_regs", "orig_ax")?,
        regs_di: byte_offset(btf, "pt_regs", "di")?,
        regs_ax: byte_offset(btf, "pt_regs", "ax")?,
        _pad2: 0,
        req_op_mask: (1u32 << op_bits) - 1,
        req_op_read: enum_value(btf, "req_op", "REQ_OP_READ")?,
        req_op_write: enum_value(btf, "req_op", "REQ_OP_WRITE")?,
        req_op_flush: enum_value(btf, "req_op", "REQ_OP_FLUSH")?,
        req_op_discard: enum_value(btf, "req_op", "REQ_OP_DISCARD")?,
        req_op_drv_in: enum_value(btf, "req_op", "REQ_OP_DRV_IN")?,
        req_op_drv_out: enum_value(btf, "req_op", "REQ_OP_DRV_OUT")?,
        has_ioac,
        _pad: 0,
    })
}

/// Opens the running kernel's BTF (lazily parsed: a full parse of vmlinux BTF costs ~40 MB of
/// peak RSS).
pub fn open_btf() -> Result<Btf, KernelError> {
    let path = btf_path();
    Btf::from_file_with_backend(&path, btf_rs::Backend::Mmap)
        .or_else(|_| Btf::from_file(&path))
        .map_err(|e| KernelError::NoBtf {
            path: path.clone(),
            why: e.to_string(),
        })
}

/// Loads the running kernel's BTF and resolves the offsets.
pub fn resolve_running_kernel() -> Result<KernelOffsets, KernelError> {
    resolve(&open_btf()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs the running kernel's BTF, which every supported machine has.
    #[test]
    fn resolves_on_running_kernel() {
        let o = resolve_running_kernel().expect("BTF offsets");
        assert!(o.task_tgid > o.task_pid || o.task_pid > 0);
        assert!(o.task_in_iowait_mask.is_power_of_two());
        assert!(o.rq_q != o.rq_cmd_flags);
        // x86-64 pt_regs: di is the 15th, orig_ax the 16th 8-byte slot (arch/x86 ptrace ABI).
        assert_eq!((o.regs_di, o.regs_orig_ax), (112, 120));
        assert_eq!(o.regs_ax, 80);
        // The block layer's operations (include/linux/blk_types.h).
        assert_eq!(
            (
                o.req_op_read,
                o.req_op_write,
                o.req_op_flush,
                o.req_op_discard
            ),
            (0, 1, 2, 3)
        );
        assert_eq!(o.req_op_mask, 0xff);
        assert_eq!((o.req_op_drv_in, o.req_op_drv_out), (34, 35));
        // The block layer times requests itself on this kernel (6.18: __RQF_STATS = 11).
        assert_eq!(o.rqf_stats, 1 << 11);
        assert!(o.rq_io_start_time_ns > o.rq_start_time_ns);
    }
}
