//! The datapath's lifecycle: mount bpffs, load the kernel object with its
//! maps pinned, attach each program to the cgroup through a pinned link, and
//! take over (or remove) what a previous agent left pinned.
//!
//! Links are pinned so the programs stay attached while the agent is
//! stopped. A restarted agent swaps its freshly loaded program into the
//! existing link (BPF_LINK_UPDATE): there is no moment with no program and
//! none with two, so nothing is missed or counted twice.
use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSock, CgroupSockAddr, Program, ProgramError, ProgramFd,
        SockOps,
        links::{FdLink, LinkError},
    },
};
use headway_common::{map_names, map_names::legacy, program_names};

use crate::{
    addr_filter, addr_table, bpf_sys, cgroup,
    pinned::{self, MapSizes, Maps, PinnedError},
    pod_stats_upgrade::{self, Carried, Upgrade, UpgradeError},
    service_steering,
    sock_table_v1::{self, OlderTable},
};

/// The kernel object, embedded at build time (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/headway.bpf.o"));

/// The embedded kernel object (empty when it was not built), for tests that
/// load programs without attaching them.
pub fn kernel_object() -> &'static [u8] {
    OBJECT
}

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this headway binary was built without its kernel object: run \
         `cargo xtask build-ebpf`, then build headway again"
    )]
    NoObject,
    #[error("cannot fill the address filter before attaching: {0}")]
    AddrFilter(#[source] addr_filter::FillError),
    #[error("cannot write the DNS address table before attaching: {0}")]
    AddrTable(#[source] addr_table::FillError),
    #[error("cannot write the services' steering table before attaching: {0}")]
    ServiceSteering(#[source] service_steering::FillError),
    #[error("cannot mount bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    #[error("cannot carry the pods' counts over to this version's pod_stats: {0}")]
    PodStatsUpgrade(#[from] UpgradeError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("cannot load the kernel object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach {name} with a BPF link (kernel < 5.7?): {source}")]
    Attach {
        name: &'static str,
        #[source]
        source: LinkAttachError,
    },
    #[error("cannot pin the link of {name} at {path}: {source}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot take over the pinned link {path}: {source}")]
    TakeOver {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How each program got attached, for the agent's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// A new link was created and pinned.
    New,
    /// The program was swapped into the link a previous agent pinned.
    Replaced,
    /// A pinned link on another cgroup was replaced by a new one here.
    Moved,
}

/// The loaded datapath. Dropping it leaves the programs attached (their
/// links are pinned) and the maps pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pub attachments: Vec<(&'static str, Attachment)>,
    /// Pins an older headway left that this one has no use for (a program
    /// or map that was merged or renamed), removed after attaching.
    pub retired: Vec<PathBuf>,
    /// Pins of derived maps whose layout changed, removed before loading
    /// so that this agent writes them anew (`pinned::DERIVED`).
    pub replaced: Vec<PathBuf>,
    /// An older `pod_stats` whose counts are being carried over (finished
    /// once the programs are attached).
    pod_stats_upgrade: Option<Upgrade>,
    /// What carrying them over did, once done.
    pub carried: Option<Carried>,
    /// The socket table as an older agent kept it, handed to the programs
    /// (see `sock_table_v1`).
    older_sockets: Option<OlderTable>,
    /// Records left in it once the programs were attached (its pins are
    /// kept while there are any).
    pub older_sockets_left: Option<u64>,
}

/// Mounts bpffs at `path` unless one is already there.
pub fn ensure_bpffs(path: &Path) -> Result<(), DatapathError> {
    fs::create_dir_all(path).map_err(io_err(path))?;
    let stat = nix::sys::statfs::statfs(path).map_err(|e| DatapathError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    if stat.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| DatapathError::MountBpffs {
        path: path.to_path_buf(),
        source,
    })
}

impl Datapath {
    /// Loads the programs, reusing maps pinned under `bpffs`, and attaches
    /// them to the cgroup at `cgroup_path`.
    pub fn start(bpffs: &Path, cgroup_path: &Path) -> Result<Datapath, DatapathError> {
        Datapath::start_with_sizes(bpffs, cgroup_path, &MapSizes::default())
    }

    /// [`Datapath::start`] with maps of the given sizes (maps pinned with
    /// other sizes are refused: `headway reset` starts over).
    pub fn start_with_sizes(
        bpffs: &Path,
        cgroup_path: &Path,
        sizes: &MapSizes,
    ) -> Result<Datapath, DatapathError> {
        let mut datapath = Datapath::open(bpffs, sizes)?;
        datapath.attach(bpffs, cgroup_path)?;
        Ok(datapath)
    }

    /// The first half of [`Datapath::start_with_sizes`]: the maps created
    /// (or reused from the pins) and the filters the programs trust
    /// rewritten, no program loaded yet. The maps can be taken and written
    /// while [`Datapath::attach`] loads the programs (the verifier takes
    /// a while); programs a previous agent attached keep running on the
    /// same maps meanwhile, as they would during a sync after the swap.
    pub fn open(bpffs: &Path, sizes: &MapSizes) -> Result<Datapath, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        ensure_bpffs(bpffs)?;
        let dir = pinned::pin_dir(bpffs);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Refuse first: a refused start must leave every pin as it was.
        pinned::check_existing_layout(bpffs, Some(sizes))?;
        let replaced = pinned::unpin_changed_derived(bpffs, sizes)?;
        let mut upgrade = pod_stats_upgrade::begin(bpffs, sizes)?;

        let pin_paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pinned::map_pin(bpffs, name)))
            .collect();
        let mut loader = EbpfLoader::new();
        // The socket table's size, as the programs hash into it.
        let table_mask = sizes.socket_positions() - 1;
        loader.override_global("SOCK_TABLE_MASK", &table_mask, true);
        // An older agent's socket table: its records move into this one as
        // their sockets are seen.
        let older_sockets = sock_table_v1::find_pinned(bpffs)?;
        let older_live = u32::from(older_sockets.is_some());
        let older_mask = older_sockets.map_or(0, |t| t.buckets - 1);
        loader.override_global("SOCK_V1_LIVE", &older_live, true);
        loader.override_global("SOCK_V1_BUCKET_MASK", &older_mask, true);
        for (name, entries) in older_sockets.iter().flat_map(OlderTable::maps) {
            loader.map_pin_path(name, pinned::map_pin(bpffs, name));
            loader.map_max_entries(name, entries);
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
            if let Some(n) = sizes.max_entries(name) {
                loader.map_max_entries(name, n);
            }
        }
        let mut ebpf = match loader.load(OBJECT) {
            Ok(ebpf) => ebpf,
            Err(e) => {
                // Leave the old map where the old agent's `status` looks.
                if let Some(upgrade) = upgrade {
                    upgrade.abandon(bpffs);
                }
                return Err(e.into());
            }
        };
        if let Some(upgrade) = &mut upgrade {
            upgrade.copy(&ebpf)?;
        }
        // The fast path's filter must hold the pinned addresses before the
        // programs that read it are attached (an upgrade may bring it new).
        addr_filter::fill_before_attach(&mut ebpf).map_err(DatapathError::AddrFilter)?;
        // Nor may the interceptor trust a table entry an older agent left.
        addr_table::fill_before_attach(&mut ebpf).map_err(DatapathError::AddrTable)?;
        // Nor may connect() read a service as an older agent left it (or
        // find nothing, on an upgrade that brings the map).
        service_steering::fill_before_attach(&mut ebpf).map_err(DatapathError::ServiceSteering)?;
        Ok(Datapath {
            ebpf,
            attachments: Vec::new(),
            retired: Vec::new(),
            replaced,
            pod_stats_upgrade: upgrade,
            carried: None,
            older_sockets,
            older_sockets_left: None,
        })
    }

    /// The second half of [`Datapath::start_with_sizes`]: loads each
    /// program and attaches it to the cgroup at `cgroup_path` (swapping
    /// it into a link a previous agent pinned), then removes the pins an
    /// older headway left. The maps may have been taken already.
    pub fn attach(&mut self, bpffs: &Path, cgroup_path: &Path) -> Result<(), DatapathError> {
        let cgroup_dir = fs::File::open(cgroup_path).map_err(|source| {
            DatapathError::Cgroup(cgroup::CgroupError::Open {
                path: cgroup_path.to_path_buf(),
                source,
            })
        })?;
        let cgroup_id = cgroup::cgroup_id(cgroup_path)?;
        for name in ATTACH_ORDER {
            let how = attach(&mut self.ebpf, name, &cgroup_dir, cgroup_id, bpffs)?;
            self.attachments.push((name, how));
        }
        if let Some(upgrade) = self.pod_stats_upgrade.take() {
            self.carried = Some(upgrade.finish(bpffs)?);
        }
        // The older socket table's pins stay while it holds records (the
        // next agent hands it on); empty, they go with the other retired
        // pins. Read after the swap: until then its programs could add some.
        let mut keep = Vec::new();
        if self.older_sockets.is_some() {
            let left = sock_table_v1::records_left(bpffs)?;
            if left > 0 {
                keep.extend(legacy::ALL.iter().map(|name| pinned::map_pin(bpffs, name)));
            }
            self.older_sockets_left = Some(left);
        }
        self.retired = remove_retired_pins(bpffs, &keep)?;
        Ok(())
    }

    /// The reader of the programs' log records (see `kernel_log`). Can be
    /// called once.
    pub fn take_logger(
        &mut self,
    ) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// Hands the maps to a writer. Can be called once.
    pub fn take_maps(&mut self) -> Result<Maps, PinnedError> {
        Maps::from_maps(|name| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| PinnedError::NotPinned(PathBuf::from(name)))
        })
    }
}

/// The order the programs are attached (swapped into their links) in:
/// the two that give records back first. On an upgrade from the older
/// socket table, a new program moves a record out of it when it sees the
/// socket (`sock_table_v1`); an old sock_ops or sock_release still
/// attached would then miss that socket's close, and its record (and
/// active count) would stay. With those two swapped first, an old program
/// that misses a moved record can only skip counting one packet (the
/// socket's counters are cumulative: the next one counts it) or report
/// the pod's address to one getpeername.
const ATTACH_ORDER: [&str; 12] = [
    program_names::SOCK_OPS,
    program_names::SOCK_RELEASE,
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::SKB_EGRESS,
    program_names::SKB_INGRESS,
    program_names::GETPEERNAME4,
    program_names::GETPEERNAME6,
    program_names::RECVMSG4,
    program_names::RECVMSG6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
];

/// The cgroup program kinds headway uses. All attach through BPF links,
/// which is all `attach` needs to know.
enum CgroupProgram<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    Skb(&'a mut CgroupSkb),
    SockOps(&'a mut SockOps),
    Sock(&'a mut CgroupSock),
}

impl CgroupProgram<'_> {
    fn load(&mut self) -> Result<(), ProgramError> {
        match self {
            CgroupProgram::SockAddr(p) => p.load(),
            CgroupProgram::Skb(p) => p.load(),
            CgroupProgram::SockOps(p) => p.load(),
            CgroupProgram::Sock(p) => p.load(),
        }
    }

    fn fd(&self) -> Result<&ProgramFd, ProgramError> {
        match self {
            CgroupProgram::SockAddr(p) => p.fd(),
            CgroupProgram::Skb(p) => p.fd(),
            CgroupProgram::SockOps(p) => p.fd(),
            CgroupProgram::Sock(p) => p.fd(),
        }
    }

    /// Attaches to `cgroup` with a new link. A BPF link never excludes other
    /// programs on the cgroup (the kernel rejects BPF_F_ALLOW_MULTI on
    /// link_create: links are multi by nature), so headway coexists with
    /// other cgroup hooks such as Cilium's.
    fn attach_link(&mut self, cgroup: &fs::File) -> Result<FdLink, LinkAttachError> {
        let mode = CgroupAttachMode::Single;
        Ok(match self {
            CgroupProgram::SockAddr(p) => {
                let id = p.attach(cgroup, mode)?;
                p.take_link(id)?.try_into()?
            }
            CgroupProgram::Skb(p) => {
                let attach_type = p
                    .expected_attach_type()
                    .ok_or(ProgramError::UnexpectedProgramType)?;
                let id = p.attach(cgroup, attach_type, mode)?;
                p.take_link(id)?.try_into()?
            }
            CgroupProgram::SockOps(p) => {
                let id = p.attach(cgroup, mode)?;
                p.take_link(id)?.try_into()?
            }
            CgroupProgram::Sock(p) => {
                let id = p.attach(cgroup, mode)?;
                p.take_link(id)?.try_into()?
            }
        })
    }
}

/// Attaching through a link fails in the program or in the link layer.
#[derive(Debug, thiserror::Error)]
pub enum LinkAttachError {
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<CgroupProgram<'a>, DatapathError> {
    let prog_err = |source| DatapathError::Program { name, source };
    match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(p)) => Ok(CgroupProgram::SockAddr(p)),
        Some(Program::CgroupSkb(p)) => Ok(CgroupProgram::Skb(p)),
        Some(Program::SockOps(p)) => Ok(CgroupProgram::SockOps(p)),
        Some(Program::CgroupSock(p)) => Ok(CgroupProgram::Sock(p)),
        Some(_) => Err(prog_err(ProgramError::UnexpectedProgramType)),
        None => Err(prog_err(ProgramError::NotLoaded)),
    }
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup_dir: &fs::File,
    cgroup_id: u64,
    bpffs: &Path,
) -> Result<Attachment, DatapathError> {
    let prog_err = |source| DatapathError::Program { name, source };
    let mut program = program(ebpf, name)?;
    program.load().map_err(prog_err)?;

    let link_path = pinned::link_pin(bpffs, name);
    let mut how = Attachment::New;
    if link_path.exists() {
        let take_over = |source| DatapathError::TakeOver {
            path: link_path.clone(),
            source,
        };
        let link = bpf_sys::obj_get(&link_path).map_err(take_over)?;
        let info = bpf_sys::cgroup_link_info(link.as_fd()).map_err(take_over)?;
        if info.cgroup_id == cgroup_id {
            let prog_fd = program.fd().map_err(prog_err)?;
            bpf_sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(take_over)?;
            return Ok(Attachment::Replaced);
        }
        // The old link hooks another cgroup: attach here first, then let the
        // old one go (removing its last reference detaches it).
        how = Attachment::Moved;
    }
    let link = program
        .attach_link(cgroup_dir)
        .map_err(|source| DatapathError::Attach { name, source })?;
    if how == Attachment::Moved {
        fs::remove_file(&link_path).map_err(io_err(&link_path))?;
    }
    link.pin(&link_path)
        .map_err(|source| DatapathError::PinLink {
            name,
            path: link_path.clone(),
            source,
        })?;
    Ok(how)
}

/// Removes the pins under `<bpffs>/headway` that this build does not know:
/// links of programs an older headway had (detaching them: after an
/// upgrade they would keep running next to their replacements), then maps
/// only those programs used. Runs after this build's programs are
/// attached, so the upgrade leaves no gap. Returns the paths removed.
fn remove_retired_pins(bpffs: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>, DatapathError> {
    let dir = pinned::pin_dir(bpffs);
    let known: Vec<PathBuf> = program_names::ALL
        .iter()
        .map(|p| pinned::link_pin(bpffs, p))
        .chain(map_names::ALL.iter().map(|m| pinned::map_pin(bpffs, m)))
        .chain(keep.iter().cloned())
        .collect();
    let mut retired: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(&dir))?
        .into_iter()
        .filter(|p| !known.contains(p))
        .collect();
    // Links first (see `reset`).
    retired.sort_by_key(|p| (!is_link_pin(p), p.clone()));
    for path in &retired {
        fs::remove_file(path).map_err(io_err(path))?;
    }
    Ok(retired)
}

fn is_link_pin(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
}

/// Detaches the programs and removes every pin under `<bpffs>/headway`.
/// Returns the paths removed. Idempotent.
pub fn reset(bpffs: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let dir = pinned::pin_dir(bpffs);
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    // Links first, so no program runs against half-removed maps.
    let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(&dir))?;
    entries.sort_by_key(|p| (!is_link_pin(p), p.clone()));
    for path in entries {
        fs::remove_file(&path).map_err(io_err(&path))?;
        removed.push(path);
    }
    fs::remove_dir(&dir).map_err(io_err(&dir))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_is_attached_once() {
        let mut order = ATTACH_ORDER.to_vec();
        let mut all = program_names::ALL.to_vec();
        order.sort_unstable();
        all.sort_unstable();
        assert_eq!(order, all);
    }
}
