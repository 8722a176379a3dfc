//! Floor programs for `bench-hooks`: the smallest program the kernel takes
//! for a hook (`r0 = 1; exit`), attached to the same cgroup next to
//! headway's, so bpf_stats times it on exactly the same events. Its ns per
//! run is what any program costs at that hook on this machine (the call
//! and bpf_stats's own two clock reads, which are dear in a VM); headway's
//! figure minus the floor is the work headway does.
//!
//! Loaded with raw bpf(2) calls: two instructions need no object file.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::Context;
use nix::libc;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;

/// `r0 = 1; exit`: every hook here reads 1 as "let it through".
const RETURN_ONE: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
    0xb7 | (1 << 32),
    // BPF_JMP | BPF_EXIT
    0x95,
];

/// A hook headway attaches a program to, and the floor's name for it.
struct Hook {
    name: &'static str,
    prog_type: u32,
    attach_type: u32,
}

const HOOKS: [Hook; 6] = [
    Hook {
        name: "floor_connect4",
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach_type: BPF_CGROUP_INET4_CONNECT,
    },
    Hook {
        name: "floor_getpeer4",
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach_type: BPF_CGROUP_INET4_GETPEERNAME,
    },
    Hook {
        name: "floor_skb_egr",
        prog_type: BPF_PROG_TYPE_CGROUP_SKB,
        attach_type: BPF_CGROUP_INET_EGRESS,
    },
    Hook {
        name: "floor_skb_ingr",
        prog_type: BPF_PROG_TYPE_CGROUP_SKB,
        attach_type: BPF_CGROUP_INET_INGRESS,
    },
    Hook {
        name: "floor_sock_ops",
        prog_type: BPF_PROG_TYPE_SOCK_OPS,
        attach_type: BPF_CGROUP_SOCK_OPS,
    },
    Hook {
        name: "floor_release",
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK,
        attach_type: BPF_CGROUP_INET_SOCK_RELEASE,
    },
];

/// The headway program each floor stands beside, for the report.
pub fn beside(floor: &str) -> &'static str {
    match floor {
        "floor_connect4" => "hw_connect4",
        "floor_getpeer4" => "hw_getpeer4",
        "floor_skb_egr" => "hw_skb_egress",
        "floor_skb_ingr" => "hw_skb_ingress",
        "floor_release" => "hw_sock_release",
        _ => "hw_sock_ops",
    }
}

/// `union bpf_attr` as BPF_PROG_LOAD reads it (up to expected_attach_type).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as BPF_LINK_CREATE reads it.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` as BPF_OBJ_GET_INFO_BY_FD reads it.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_prog_info` up to `run_cnt` (the kernel fills what fits).
const PROG_INFO_LEN: usize = 208;
const RUN_TIME_NS_OFFSET: usize = 192;
const RUN_CNT_OFFSET: usize = 200;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized bpf_attr prefix; the kernel
    // reads (and for GET_INFO writes through) only what `size_of` says.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// One loaded and attached floor program.
struct Attached {
    name: &'static str,
    prog: OwnedFd,
    /// Dropping the link detaches the program.
    _link: OwnedFd,
}

/// The floor programs of every hook headway uses, attached to one cgroup
/// for as long as this lives.
pub struct Floors {
    attached: Vec<Attached>,
}

impl Floors {
    pub fn attach(cgroup: &Path) -> anyhow::Result<Floors> {
        let cg = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let license = c"GPL";
        let mut attached = Vec::new();
        for hook in &HOOKS {
            let mut attr = ProgLoadAttr {
                prog_type: hook.prog_type,
                insn_cnt: RETURN_ONE.len() as u32,
                insns: RETURN_ONE.as_ptr() as u64,
                license: license.as_ptr() as u64,
                expected_attach_type: hook.attach_type,
                ..ProgLoadAttr::default()
            };
            attr.prog_name[..hook.name.len()].copy_from_slice(hook.name.as_bytes());
            let fd = sys_bpf(BPF_PROG_LOAD, &mut attr)
                .with_context(|| format!("loading {}", hook.name))?;
            // SAFETY: a new fd the kernel just gave us.
            let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let mut link = LinkCreateAttr {
                prog_fd: prog.as_raw_fd() as u32,
                target_fd: cg.as_raw_fd() as u32,
                attach_type: hook.attach_type,
                flags: 0,
            };
            let fd = sys_bpf(BPF_LINK_CREATE, &mut link)
                .with_context(|| format!("attaching {}", hook.name))?;
            // SAFETY: as above.
            let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            attached.push(Attached {
                name: hook.name,
                prog,
                _link: link,
            });
        }
        Ok(Floors { attached })
    }

    /// (runs, run time in ns) per floor program so far.
    pub fn stats(&self) -> anyhow::Result<Vec<(&'static str, (u64, u64))>> {
        self.attached
            .iter()
            .map(|a| {
                let mut info = [0u8; PROG_INFO_LEN];
                let mut attr = InfoAttr {
                    bpf_fd: a.prog.as_raw_fd() as u32,
                    info_len: PROG_INFO_LEN as u32,
                    info: info.as_mut_ptr() as u64,
                };
                sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
                    .with_context(|| format!("reading {}'s statistics", a.name))?;
                let word =
                    |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().expect("8 bytes"));
                Ok((a.name, (word(RUN_CNT_OFFSET), word(RUN_TIME_NS_OFFSET))))
            })
            .collect()
    }
}
