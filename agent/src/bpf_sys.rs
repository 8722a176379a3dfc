//! The few BPF syscalls aya 0.14 does not expose: opening a pinned link as a
//! plain fd, reading which cgroup a link is attached to, swapping the
//! program behind a link in place (BPF_LINK_UPDATE), which is how a
//! restarted agent replaces its programs without a gap or an overlap, and
//! batched map updates and deletes (one syscall for many entries: a full
//! sync of 100,000 endpoints writes about 800,000 entries).
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

// Command numbers from include/uapi/linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` is large; every command reads only its own prefix.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, offset: usize, value: u32) {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    }
    fn put_u64(&mut self, offset: usize, value: u64) {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-initialised bpf_attr of adequate size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = Attr::new();
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
    attr.put_u64(0, c_path.as_ptr() as u64);
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel reports about a cgroup link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
}

/// Reads `struct bpf_link_info` of a cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info { u32 type; u32 id; u32 prog_id; union (8-aligned,
    // at 16) { struct { u64 cgroup_id; u32 attach_type; } cgroup; ... } }
    let mut info = [0u64; 32];
    let mut attr = Attr::new();
    // struct { u32 bpf_fd; u32 info_len; u64 info; }
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, std::mem::size_of_val(&info) as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let word0 = info[0].to_ne_bytes();
    let word1 = info[1].to_ne_bytes();
    Ok(CgroupLinkInfo {
        link_id: u32::from_ne_bytes([word0[4], word0[5], word0[6], word0[7]]),
        prog_id: u32::from_ne_bytes([word1[0], word1[1], word1[2], word1[3]]),
        cgroup_id: info[2],
    })
}

/// Atomically replaces the program behind `link` with `new_prog`.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    // struct { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, new_prog.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// A batch stopped at entry `done` (every entry before it went through).
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: io::Error,
}

/// `struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd;
/// u64 elem_flags, flags; } batch`; the kernel writes back in `count` how
/// many entries it processed.
fn map_batch(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> Result<(), BatchError> {
    let mut attr = Attr::new();
    attr.put_u64(16, keys as u64);
    attr.put_u64(24, values as u64);
    attr.put_u32(32, count as u32);
    attr.put_u32(36, map.as_raw_fd() as u32);
    match sys_bpf(cmd, &mut attr) {
        Ok(_) => Ok(()),
        Err(error) => {
            let done = u32::from_ne_bytes(attr.0[32..36].try_into().expect("4 bytes"));
            Err(BatchError {
                done: (done as usize).min(count),
                error,
            })
        }
    }
}

/// Writes `keys[i] → values[i]` (BPF_MAP_UPDATE_BATCH, kernel ≥ 5.6).
/// `K` and `V` must be the map's key and value types (`#[repr(C)]`, sizes
/// equal to the map's).
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    map_batch(
        BPF_MAP_UPDATE_BATCH,
        map,
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    )
}

/// Deletes `keys` (BPF_MAP_DELETE_BATCH); stops at a missing key (ENOENT).
pub fn map_delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    if keys.is_empty() {
        return Ok(());
    }
    map_batch(
        BPF_MAP_DELETE_BATCH,
        map,
        keys.as_ptr().cast(),
        std::ptr::null(),
        keys.len(),
    )
}
