//! The pinned layout under `<bpffs>/headway/`: where each map and link
//! lives, what shape each map must have, and typed handles to the maps.
//! Used by the datapath (which creates them), the writer and `status`
//! (which open them while the agent may be down).
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapType, PerCpuArray};
use headway_common::{
    AddrIndex, AddrKey, AddrTableEntry, Backend, BackendKey, Config, EndpointState, NameEntry,
    ObservationKey, ObservationPage, PIN_DIR, PendingQuery, PendingQueryKey, PodCounters, PodMeta,
    PodRef, ServiceCounters, ServiceEndpointKey, ServiceMeta, ServicePortKey, ServiceSteering,
    SockSlot, addr_filter, addr_table, capacity, dns_counter, map_names, sock_counter, sock_table,
    steer_counter,
};

use crate::{
    addr_filter::AddrFilter, addr_table::AddrTable, generation::Generation, map_plan::MapContents,
};

#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error("nothing is pinned at {0}: is the agent installed on this node (has it ever run)?")]
    NotPinned(PathBuf),
    #[error("permission denied opening {0}: reading BPF maps needs root (or CAP_BPF)")]
    PermissionDenied(PathBuf),
    #[error("cannot open pinned map {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "pinned map {path} has an incompatible layout ({found}; this agent expects {expected}); \
         it was made by another headway version: run `headway reset` to start over"
    )]
    Incompatible {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "pinned map {path} was written by another headway version ({found}; this one expects \
         {expected}); this version's agent replaces it when it starts: start it, then try again"
    )]
    DerivedFromOtherVersion {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot remove the pin {path} (its layout changed; it is written anew): {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read map {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// `<bpffs>/headway`
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(PIN_DIR)
}

pub fn map_pin(bpffs: &Path, map: &str) -> PathBuf {
    pin_dir(bpffs).join(map)
}

pub fn link_pin(bpffs: &Path, program: &str) -> PathBuf {
    pin_dir(bpffs).join(format!("link_{program}"))
}

/// Where the hook `program`'s pinned link is attached. Fails when the
/// link is not pinned, or when it was detached (BPF_LINK_DETACH, or its
/// cgroup removed), which leaves the pin in place but attached to nothing.
/// Costs two syscalls: cheap enough for every health probe.
pub fn link_attachment(bpffs: &Path, program: &str) -> io::Result<crate::bpf_sys::CgroupLinkInfo> {
    let fd = crate::bpf_sys::obj_get(&link_pin(bpffs, program))?;
    let info = crate::bpf_sys::cgroup_link_info(std::os::fd::AsFd::as_fd(&fd))?;
    if info.cgroup_id == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the link is detached from its cgroup",
        ));
    }
    Ok(info)
}

/// Key size, value size and capacity every pinned map must have.
pub struct MapShape {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

pub const MAP_SHAPES: [MapShape; 22] = {
    const fn shape<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> MapShape {
        MapShape {
            name,
            map_type,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }
    [
        shape::<AddrKey, PodRef>(map_names::POD_ADDRS, MapType::Hash, capacity::POD_ADDRS),
        shape::<u32, PodCounters>(map_names::POD_STATS, MapType::Array, capacity::PODS),
        shape::<u32, u64>(map_names::POD_DNS_ANSWERS, MapType::Array, capacity::PODS),
        shape::<u32, PodMeta>(map_names::PODS, MapType::Hash, capacity::PODS),
        shape::<u32, ServiceMeta>(map_names::SERVICES, MapType::Hash, capacity::SERVICES),
        shape::<ServiceEndpointKey, EndpointState>(
            map_names::SVC_ENDPOINTS,
            MapType::Hash,
            capacity::SVC_ENDPOINTS,
        ),
        shape::<u64, NameEntry>(map_names::DNS_NAMES, MapType::Hash, capacity::DNS_NAMES),
        shape::<PendingQueryKey, PendingQuery>(
            map_names::DNS_PENDING,
            MapType::LruHash,
            capacity::DNS_PENDING,
        ),
        shape::<ObservationKey, ObservationPage>(
            map_names::DNS_OBS,
            MapType::LruHash,
            capacity::DNS_OBS,
        ),
        shape::<u32, u64>(
            map_names::DNS_COUNTERS,
            MapType::PerCpuArray,
            dns_counter::COUNT,
        ),
        shape::<BackendKey, Backend>(
            map_names::SVC_BACKENDS,
            MapType::Hash,
            capacity::SVC_BACKENDS,
        ),
        shape::<u32, Config>(map_names::CONFIG, MapType::Array, 1),
        shape::<u32, u64>(
            map_names::STEER_COUNTERS,
            MapType::PerCpuArray,
            steer_counter::COUNT,
        ),
        shape::<u32, ServiceCounters>(map_names::SVC_STATS, MapType::Array, capacity::SERVICES),
        shape::<ServicePortKey, u32>(map_names::SVC_PORTS, MapType::Hash, capacity::SVC_PORTS),
        shape::<u32, u64>(map_names::ADDR_FILTER, MapType::Array, addr_filter::WORDS),
        shape::<AddrKey, AddrIndex>(map_names::DNS_ADDRS, MapType::Hash, capacity::DNS_ADDRS),
        shape::<u32, u64>(map_names::POD_ADDRS_GEN, MapType::Array, 1),
        shape::<u32, SockSlot>(
            map_names::SOCK_TABLE,
            MapType::Array,
            sock_table::positions_for(capacity::SOCKETS),
        ),
        shape::<u32, u64>(
            map_names::SOCK_COUNTERS,
            MapType::PerCpuArray,
            sock_counter::COUNT,
        ),
        shape::<u32, AddrTableEntry>(map_names::ADDR_TABLE, MapType::Array, addr_table::SIZE),
        shape::<u32, ServiceSteering>(map_names::SVC_STEERING, MapType::Array, capacity::SERVICES),
    ]
};

/// Sizes of the maps that grow with the cluster, chosen at load time
/// (`--max-endpoints`, `--max-services`). The defaults are the compiled-in
/// capacities: 65,536 endpoint addresses and pods, 16,384 services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Pod addresses and pods (ids index `pod_stats`); per-service
    /// endpoints and backend slots get twice as many (an address may be in
    /// two services), DNS names four times (service, pod and dashed names).
    pub max_endpoints: u32,
    /// Services (ids index `svc_stats`).
    pub max_services: u32,
    /// Client sockets talking to pods at once (records of the socket
    /// table; rounded up to a power of two, at least 32).
    pub max_sockets: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            max_endpoints: capacity::POD_ADDRS,
            max_services: capacity::SERVICES,
            max_sockets: capacity::SOCKETS,
        }
    }
}

impl MapSizes {
    /// The size of map `name` if it is one of the sized ones.
    pub fn max_entries(&self, name: &str) -> Option<u32> {
        let e = self.max_endpoints;
        Some(match name {
            map_names::POD_ADDRS
            | map_names::PODS
            | map_names::POD_STATS
            | map_names::POD_DNS_ANSWERS => e,
            // `dns_addrs` keeps gone addresses too, until their slots are
            // needed.
            map_names::SVC_ENDPOINTS | map_names::SVC_BACKENDS | map_names::DNS_ADDRS => {
                e.saturating_mul(2)
            }
            map_names::DNS_NAMES => e.saturating_mul(4),
            map_names::SERVICES | map_names::SVC_STATS | map_names::SVC_STEERING => {
                self.max_services
            }
            map_names::SOCK_TABLE => self.socket_positions(),
            _ => return None,
        })
    }

    /// Positions of the socket table (the kernel programs get the mask).
    pub fn socket_positions(&self) -> u32 {
        sock_table::positions_for(self.max_sockets)
    }
}

/// The capacity of the map pinned as `name`, as the kernel has it.
pub fn pinned_max_entries(bpffs: &Path, name: &str) -> Option<u32> {
    let info = open_map(&map_pin(bpffs, name)).ok()?.info().ok()?;
    Some(info.max_entries())
}

pub(crate) fn open_map(path: &Path) -> Result<MapData, PinnedError> {
    MapData::from_pin(path).map_err(|source| {
        let io_kind = match &source {
            MapError::SyscallError(e) => Some(e.io_error.kind()),
            _ => None,
        };
        match io_kind {
            Some(io::ErrorKind::NotFound) => PinnedError::NotPinned(path.to_path_buf()),
            Some(io::ErrorKind::PermissionDenied) => {
                PinnedError::PermissionDenied(path.to_path_buf())
            }
            _ => PinnedError::Open {
                path: path.to_path_buf(),
                source,
            },
        }
    })
}

/// Maps the agent writes whole from other maps before any program is
/// attached (`service_steering`, `addr_table`): a pinned one whose layout
/// differs from this build's (an upgrade that changed it) is replaced, not
/// refused. Programs already attached keep the old one until theirs
/// replace them.
pub const DERIVED: [&str; 2] = [map_names::SVC_STEERING, map_names::ADDR_TABLE];

/// Removes the pins of [`DERIVED`] maps whose layout differs from this
/// build's, so that loading creates them anew. Returns the paths removed.
pub fn unpin_changed_derived(bpffs: &Path, sizes: &MapSizes) -> Result<Vec<PathBuf>, PinnedError> {
    let mut removed = Vec::new();
    for shape in MAP_SHAPES.iter().filter(|s| DERIVED.contains(&s.name)) {
        let path = map_pin(bpffs, shape.name);
        if path.exists()
            && layout_differs(shape, &path, &pinned_info(&path)?, Some(sizes))?.is_some()
        {
            std::fs::remove_file(&path).map_err(|source| PinnedError::Unpin {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Checks every map already pinned under `bpffs` against the shapes this
/// build expects, so new programs are never paired with stale maps. With
/// `sizes` (the agent loading its programs) the sized maps must have
/// exactly those sizes, and [`DERIVED`] maps are left to
/// [`unpin_changed_derived`]; without (readers), any size is fine.
pub fn check_existing_layout(bpffs: &Path, sizes: Option<&MapSizes>) -> Result<(), PinnedError> {
    for shape in &MAP_SHAPES {
        let path = map_pin(bpffs, shape.name);
        if !path.exists() {
            continue;
        }
        let derived = DERIVED.contains(&shape.name);
        // The agent replaces a derived map of another layout
        // ([`unpin_changed_derived`]).
        if derived && sizes.is_some() {
            continue;
        }
        let info = pinned_info(&path)?;
        if let Some((found, expected)) = layout_differs(shape, &path, &info, sizes)? {
            // An older layout of `pod_stats` the agent carries over.
            if shape.name == map_names::POD_STATS
                && crate::pod_stats_upgrade::is_v1_layout(&info, sizes)
            {
                if sizes.is_some() {
                    continue;
                }
                return Err(PinnedError::DerivedFromOtherVersion {
                    path,
                    found,
                    expected,
                });
            }
            if derived {
                return Err(PinnedError::DerivedFromOtherVersion {
                    path,
                    found,
                    expected,
                });
            }
            return Err(PinnedError::Incompatible {
                path,
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// What the kernel says of the map pinned at `path`.
pub(crate) fn pinned_info(path: &Path) -> Result<aya::maps::MapInfo, PinnedError> {
    open_map(path)?.info().map_err(|source| PinnedError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// How the map pinned at `path` differs from `shape` (found, expected),
/// if it does (see [`check_existing_layout`] for `sizes`).
fn layout_differs(
    shape: &MapShape,
    path: &Path,
    info: &aya::maps::MapInfo,
    sizes: Option<&MapSizes>,
) -> Result<Option<(String, String)>, PinnedError> {
    let map_type = info.map_type().map_err(|source| PinnedError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let found = (
        map_type,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
    );
    let max_entries = match (sizes, MapSizes::default().max_entries(shape.name)) {
        (Some(sizes), Some(_)) => sizes.max_entries(shape.name).unwrap_or(shape.max_entries),
        // A reader accepts whatever size the agent chose.
        (None, Some(_)) => info.max_entries(),
        (_, None) => shape.max_entries,
    };
    let expected = (
        shape.map_type,
        shape.key_size,
        shape.value_size,
        max_entries,
    );
    if found == expected {
        return Ok(None);
    }
    let show = |(t, k, v, n): (MapType, u32, u32, u32)| {
        format!("{t:?}, key {k} B, value {v} B, {n} entries")
    };
    Ok(Some((show(found), show(expected))))
}

/// Typed handles to every headway map.
pub struct Maps {
    pub pod_addrs: HashMap<MapData, AddrKey, PodRef>,
    pub pod_stats: Array<MapData, PodCounters>,
    /// Kernel-written: DNS answers per pod id.
    pub pod_dns_answers: Array<MapData, u64>,
    pub pods: HashMap<MapData, u32, PodMeta>,
    pub services: HashMap<MapData, u32, ServiceMeta>,
    pub svc_endpoints: HashMap<MapData, ServiceEndpointKey, EndpointState>,
    pub svc_backends: HashMap<MapData, BackendKey, Backend>,
    pub svc_ports: HashMap<MapData, ServicePortKey, u32>,
    /// The connect hooks' fast path (see `map_names::ADDR_FILTER`).
    pub addr_filter: AddrFilter,
    pub dns_names: HashMap<MapData, u64, NameEntry>,
    /// Kernel-written (LRU): what each client netns learned from DNS.
    pub dns_obs: HashMap<MapData, ObservationKey, ObservationPage>,
    /// Agent-written: each address's pod and slots (`crate::dns_index`).
    pub dns_addrs: HashMap<MapData, AddrKey, AddrIndex>,
    /// Agent-written: `dns_addrs` again, for inline reads (`crate::addr_table`).
    pub addr_table: AddrTable,
    pub config: Array<MapData, Config>,
    pub dns_counters: PerCpuArray<MapData, u64>,
    pub steer_counters: PerCpuArray<MapData, u64>,
    /// Kernel-written: per-service decisions and lookups, by service id.
    pub svc_stats: Array<MapData, ServiceCounters>,
    /// Agent-written: what connect() needs of each service, by id
    /// (`crate::service_steering`).
    pub svc_steering: Array<MapData, ServiceSteering>,
    /// Agent-written: bumped after every change of `pod_addrs`.
    pub pod_addrs_gen: Generation,
    /// Kernel-written: records of the socket table taken, freed, and
    /// sockets that found it full.
    pub sock_counters: PerCpuArray<MapData, u64>,
}

impl Maps {
    /// Opens the maps pinned under `bpffs` (the agent need not be running).
    pub fn open_pinned(bpffs: &Path) -> Result<Maps, PinnedError> {
        check_existing_layout(bpffs, None)?;
        let dir = pin_dir(bpffs);
        if !dir.exists() {
            return Err(PinnedError::NotPinned(dir));
        }
        let open = |name: &'static str| -> Result<Map, PinnedError> {
            let path = map_pin(bpffs, name);
            let data = open_map(&path)?;
            Map::from_map_data(data).map_err(|source| PinnedError::Open { path, source })
        };
        Maps::from_maps(open)
    }

    /// Builds the handles from a source of untyped maps by name.
    pub fn from_maps(
        mut take: impl FnMut(&'static str) -> Result<Map, PinnedError>,
    ) -> Result<Maps, PinnedError> {
        /// Converts an untyped map into the typed handle `T`.
        fn typed<T: TryFrom<Map, Error = MapError>>(
            name: &'static str,
            map: Map,
        ) -> Result<T, PinnedError> {
            T::try_from(map).map_err(|source| PinnedError::Open {
                path: PathBuf::from(name),
                source,
            })
        }
        Ok(Maps {
            pod_addrs: typed(map_names::POD_ADDRS, take(map_names::POD_ADDRS)?)?,
            pod_stats: typed(map_names::POD_STATS, take(map_names::POD_STATS)?)?,
            pod_dns_answers: typed(
                map_names::POD_DNS_ANSWERS,
                take(map_names::POD_DNS_ANSWERS)?,
            )?,
            pods: typed(map_names::PODS, take(map_names::PODS)?)?,
            services: typed(map_names::SERVICES, take(map_names::SERVICES)?)?,
            svc_endpoints: typed(map_names::SVC_ENDPOINTS, take(map_names::SVC_ENDPOINTS)?)?,
            svc_backends: typed(map_names::SVC_BACKENDS, take(map_names::SVC_BACKENDS)?)?,
            svc_ports: typed(map_names::SVC_PORTS, take(map_names::SVC_PORTS)?)?,
            addr_filter: AddrFilter::new(typed(
                map_names::ADDR_FILTER,
                take(map_names::ADDR_FILTER)?,
            )?),
            dns_names: typed(map_names::DNS_NAMES, take(map_names::DNS_NAMES)?)?,
            dns_obs: typed(map_names::DNS_OBS, take(map_names::DNS_OBS)?)?,
            dns_addrs: typed(map_names::DNS_ADDRS, take(map_names::DNS_ADDRS)?)?,
            addr_table: AddrTable::new(typed(map_names::ADDR_TABLE, take(map_names::ADDR_TABLE)?)?),
            config: typed(map_names::CONFIG, take(map_names::CONFIG)?)?,
            dns_counters: typed(map_names::DNS_COUNTERS, take(map_names::DNS_COUNTERS)?)?,
            steer_counters: typed(map_names::STEER_COUNTERS, take(map_names::STEER_COUNTERS)?)?,
            svc_stats: typed(map_names::SVC_STATS, take(map_names::SVC_STATS)?)?,
            svc_steering: typed(map_names::SVC_STEERING, take(map_names::SVC_STEERING)?)?,
            pod_addrs_gen: Generation::new(typed(
                map_names::POD_ADDRS_GEN,
                take(map_names::POD_ADDRS_GEN)?,
            )?),
            sock_counters: typed(map_names::SOCK_COUNTERS, take(map_names::SOCK_COUNTERS)?)?,
        })
    }

    /// What the agent-owned maps hold right now.
    pub fn read_contents(&self) -> Result<MapContents, PinnedError> {
        Ok(MapContents {
            services: collect(map_names::SERVICES, self.services.iter())?,
            pods: collect(map_names::PODS, self.pods.iter())?,
            pod_addrs: collect(map_names::POD_ADDRS, self.pod_addrs.iter())?,
            svc_endpoints: collect(map_names::SVC_ENDPOINTS, self.svc_endpoints.iter())?,
            svc_backends: collect(map_names::SVC_BACKENDS, self.svc_backends.iter())?,
            svc_ports: collect(map_names::SVC_PORTS, self.svc_ports.iter())?,
            dns_names: collect(map_names::DNS_NAMES, self.dns_names.iter())?,
        })
    }

    /// Entries in each hash map, by map name (arrays are always full).
    pub fn entry_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<&'static str, usize>, PinnedError> {
        fn count<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> usize {
            map.keys().filter(Result::is_ok).count()
        }
        Ok([
            (map_names::POD_ADDRS, count(&self.pod_addrs)),
            (map_names::PODS, count(&self.pods)),
            (map_names::SERVICES, count(&self.services)),
            (map_names::SVC_ENDPOINTS, count(&self.svc_endpoints)),
            (map_names::SVC_BACKENDS, count(&self.svc_backends)),
            (map_names::SVC_PORTS, count(&self.svc_ports)),
            (map_names::DNS_NAMES, count(&self.dns_names)),
            (map_names::DNS_OBS, count(&self.dns_obs)),
            (map_names::DNS_ADDRS, count(&self.dns_addrs)),
        ]
        .into_iter()
        .collect())
    }

    /// A per-CPU counter array summed over CPUs.
    pub fn sum_counters(
        name: &'static str,
        map: &PerCpuArray<MapData, u64>,
        count: u32,
    ) -> Result<Vec<u64>, PinnedError> {
        (0..count)
            .map(|i| {
                map.get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .map_err(|source| PinnedError::Read { name, source })
            })
            .collect()
    }

    /// What the kernel counted for each of `pod_ids`.
    pub fn read_stats(
        &self,
        pod_ids: impl Iterator<Item = u32>,
    ) -> Result<std::collections::BTreeMap<u32, PodTally>, PinnedError> {
        pod_ids
            .map(|id| {
                let counters = self
                    .pod_stats
                    .get(&id, 0)
                    .map_err(|source| PinnedError::Read {
                        name: map_names::POD_STATS,
                        source,
                    })?;
                let dns_answers =
                    self.pod_dns_answers
                        .get(&id, 0)
                        .map_err(|source| PinnedError::Read {
                            name: map_names::POD_DNS_ANSWERS,
                            source,
                        })?;
                Ok((
                    id,
                    PodTally {
                        counters,
                        dns_answers,
                    },
                ))
            })
            .collect()
    }
}

/// What the kernel counted for one pod: its `pod_stats` slot and its
/// `pod_dns_answers` slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodTally {
    pub counters: PodCounters,
    pub dns_answers: u64,
}

fn collect<K: Ord, V>(
    name: &'static str,
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
) -> Result<std::collections::BTreeMap<K, V>, PinnedError> {
    let mut out = std::collections::BTreeMap::new();
    for entry in iter {
        match entry {
            Ok((k, v)) => {
                out.insert(k, v);
            }
            // Deleted between the key walk and the lookup: it is gone anyway.
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(PinnedError::Read { name, source }),
        }
    }
    Ok(out)
}
