//! Struct member offsets of the running kernel, read from its BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF has no CO-RE relocations, so the programs read kernel structs at offsets that user
//! space resolves here and passes in `Config`. A missing member is an error that names it, so a
//! kernel whose layout changed fails loudly at start instead of producing wrong numbers.
use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use monitor_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where the kernel BTF is read from: `$STALLMON_BTF_PATH` (for tests of the error path), else
/// [`VMLINUX_BTF`].
pub fn btf_path() -> std::path::PathBuf {
    std::env::var_os("STALLMON_BTF_PATH")
        .map(Into::into)
        .unwrap_or_else(|| VMLINUX_BTF.into())
}

/// Offset of `member` in `struct name`, in bits, searching anonymous struct/union members too.
fn member_bits(btf: &Btf, strukt: &str, member: &str) -> Result<(u32, Option<u32>)> {
    let types = btf
        .resolve_types_by_name(strukt)
        .with_context(|| format!("struct {strukt} not found in kernel BTF"))?;
    for t in types {
        if let Type::Struct(s) = t
            && let Some(found) = find_member(btf, &s, member, 0)?
        {
            return Ok(found);
        }
    }
    bail!("kernel BTF has no member {strukt}.{member}")
}

fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    member: &str,
    base: u32,
) -> Result<Option<(u32, Option<u32>)>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            let bitfield = m.bitfield_size().filter(|&size| size != 0);
            return Ok(Some((base + m.bit_offset(), bitfield)));
        }
        if name.is_empty() {
            // Anonymous struct or union: look inside.
            let mut ty = btf.resolve_chained_type(m)?;
            loop {
                match ty {
                    Type::Struct(ref inner) | Type::Union(ref inner) => {
                        if let Some(found) = find_member(btf, inner, member, base + m.bit_offset())?
                        {
                            return Ok(Some(found));
                        }
                        break;
                    }
                    Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) => {
                        let inner = ty.as_btf_type().ok_or_else(|| anyhow!("bad BTF type"))?;
                        ty = btf.resolve_chained_type(inner)?;
                    }
                    _ => break,
                }
            }
        }
    }
    Ok(None)
}

fn byte_offset(btf: &Btf, strukt: &str, member: &str) -> Result<u32> {
    let (bits, bitfield) = member_bits(btf, strukt, member)?;
    if bitfield.is_some() || bits % 8 != 0 {
        bail!("{strukt}.{member} is a bitfield; expected a plain member");
    }
    Ok(bits / 8)
}

/// Resolves every offset the kernel programs need.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let (iowait_bits, _) = member_bits(btf, "task_struct", "in_iowait")?;
    Ok(KernelOffsets {
        task_pid: byte_offset(btf, "task_struct", "pid")?,
        task_tgid: byte_offset(btf, "task_struct", "tgid")?,
        task_files: byte_offset(btf, "task_struct", "files")?,
        task_in_iowait_byte: iowait_bits / 8,
        task_in_iowait_mask: 1 << (iowait_bits % 8),
        files_fdt: byte_offset(btf, "files_struct", "fdt")?,
        fdtable_max_fds: byte_offset(btf, "fdtable", "max_fds")?,
        fdtable_fd: byte_offset(btf, "fdtable", "fd")?,
        file_inode: byte_offset(btf, "file", "f_inode")?,
        inode_mode: byte_offset(btf, "inode", "i_mode")?,
        rq_cmd_flags: byte_offset(btf, "request", "cmd_flags")?,
        rq_data_len: byte_offset(btf, "request", "__data_len")?,
        rq_q: byte_offset(btf, "request", "q")?,
        queue_disk: byte_offset(btf, "request_queue", "disk")?,
        disk_major: byte_offset(btf, "gendisk", "major")?,
        disk_first_minor: byte_offset(btf, "gendisk", "first_minor")?,
    })
}

/// Loads the running kernel's BTF and resolves the offsets.
pub fn resolve_running_kernel() -> Result<KernelOffsets> {
    let path = btf_path();
    // The mmap backend parses lazily: a full parse of vmlinux BTF costs ~40 MB of peak RSS.
    let btf = Btf::from_file_with_backend(&path, btf_rs::Backend::Mmap)
        .or_else(|_| Btf::from_file(&path))
        .with_context(|| {
            format!(
                "cannot read kernel BTF at {} (CONFIG_DEBUG_INFO_BTF=y is required)",
                path.display()
            )
        })?;
    resolve(&btf)
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
    }
}
