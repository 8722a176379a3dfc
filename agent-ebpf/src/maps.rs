//! Every map the kernel programs use. Capacities here are defaults; the
//! agent may resize them before loading. Names match
//! `headway_common::map_names`.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use headway_common::{
    AddrIndex, AddrKey, AddrTableEntry, Backend, BackendKey, Config, EndpointState, NameEntry,
    ObservationCacheEntry, ObservationKey, ObservationPage, PendingQuery, PendingQueryKey,
    PodCounters, PodMeta, PodRef, ServiceCounters, ServiceEndpointKey, ServiceMeta, ServicePortKey,
    ServiceSteering, SockSlot, addr_filter, addr_table, capacity, dns_counter, obs_cache,
    sock_counter, sock_table, sock_table_v1, steer_counter,
};

#[btf_map(name = "pod_addrs")]
pub static POD_ADDRS: HashMap<AddrKey, PodRef, { capacity::POD_ADDRS as usize }> = HashMap::new();

#[btf_map(name = "addr_bits")]
pub static ADDR_FILTER: Array<u64, { addr_filter::WORDS as usize }> = Array::new();

// Mappable only so that the array starts on a page: each 64-byte entry is
// then one cache line. The agent also maps it, to add counts atomically
// when it carries an older layout's over (`pod_stats_upgrade`).
#[btf_map(name = "pod_stats")]
pub static POD_STATS: Array<
    PodCounters,
    { capacity::PODS as usize },
    { aya_ebpf::bindings::BPF_F_MMAPABLE as usize },
> = Array::new();

#[btf_map(name = "pod_dns_answers")]
pub static POD_DNS_ANSWERS: Array<
    u64,
    { capacity::PODS as usize },
    { aya_ebpf::bindings::BPF_F_MMAPABLE as usize },
> = Array::new();

// The maps below are written by the agent and read by `headway status`; the
// kernel does not read them yet, but they are declared here so the one BPF
// object defines the whole pinned layout with BTF.
#[btf_map(name = "pods")]
pub static PODS: HashMap<u32, PodMeta, { capacity::PODS as usize }> = HashMap::new();

#[btf_map(name = "services")]
pub static SERVICES: HashMap<u32, ServiceMeta, { capacity::SERVICES as usize }> = HashMap::new();

#[btf_map(name = "svc_endpoints")]
pub static SVC_ENDPOINTS: HashMap<
    ServiceEndpointKey,
    EndpointState,
    { capacity::SVC_ENDPOINTS as usize },
> = HashMap::new();

// DNS: the names of headless services and the slots of their addresses
// (agent-written), queries in flight and what each client network namespace
// learned (kernel-written).
#[btf_map(name = "dns_names")]
pub static DNS_NAMES: HashMap<u64, NameEntry, { capacity::DNS_NAMES as usize }> = HashMap::new();

#[btf_map(name = "dns_pending")]
pub static DNS_PENDING: LruHashMap<
    PendingQueryKey,
    PendingQuery,
    { capacity::DNS_PENDING as usize },
> = LruHashMap::new();

#[btf_map(name = "dns_obs")]
pub static DNS_OBS: LruHashMap<ObservationKey, ObservationPage, { capacity::DNS_OBS as usize }> =
    LruHashMap::new();

// Not pinned: a cache in front of `dns_obs` (see
// `headway_common::obs_cache`), created empty with each load of the
// programs, which is always correct (a miss reads `dns_obs`). Mappable
// only so that its entries start on a page: each 32-byte entry then lies
// within one cache line.
#[btf_map(name = "dns_obs_cache")]
pub static DNS_OBS_CACHE: Array<
    ObservationCacheEntry,
    { obs_cache::ENTRIES as usize },
    { aya_ebpf::bindings::BPF_F_MMAPABLE as usize },
> = Array::new();

#[btf_map(name = "dns_addrs")]
pub static DNS_ADDRS: HashMap<AddrKey, AddrIndex, { capacity::DNS_ADDRS as usize }> =
    HashMap::new();

#[btf_map(name = "addr_table")]
// Mappable: the agent writes it through a shared mapping.
pub static ADDR_TABLE: Array<
    AddrTableEntry,
    { addr_table::SIZE as usize },
    { aya_ebpf::bindings::BPF_F_MMAPABLE as usize },
> = Array::new();

#[btf_map(name = "pod_addrs_gen")]
pub static POD_ADDRS_GEN: Array<u64, 1> = Array::new();

#[btf_map(name = "dns_counters")]
pub static DNS_COUNTERS: PerCpuArray<u64, { dns_counter::COUNT as usize }> = PerCpuArray::new();

// Steering: eligible pods per service and family, the agent's settings, and
// what the connect hooks decided.
#[btf_map(name = "svc_backends")]
pub static SVC_BACKENDS: HashMap<BackendKey, Backend, { capacity::SVC_BACKENDS as usize }> =
    HashMap::new();

// Mappable only so that its values start on a page: each 128-byte entry is
// then two whole cache lines. A plain array's values start where the
// kernel's `struct bpf_array` ends (312 bytes on 6.18: 56 bytes into a
// line), so a 64-byte value spans two lines.
#[btf_map(name = "svc_steering")]
pub static SVC_STEERING: Array<
    ServiceSteering,
    { capacity::SERVICES as usize },
    { aya_ebpf::bindings::BPF_F_MMAPABLE as usize },
> = Array::new();

#[btf_map(name = "svc_ports")]
pub static SVC_PORTS: HashMap<ServicePortKey, u32, { capacity::SVC_PORTS as usize }> =
    HashMap::new();

#[btf_map(name = "config")]
pub static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "steer_counters")]
pub static STEER_COUNTERS: PerCpuArray<u64, { steer_counter::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "svc_stats")]
pub static SVC_STATS: Array<ServiceCounters, { capacity::SERVICES as usize }> = Array::new();

// What headway keeps for each client socket while it lives (see
// `sock_table`). Mappable so that its values start on a page: each slot
// is then exactly one cache line.
#[btf_map(name = "sock_table")]
pub static SOCK_TABLE: Array<
    SockSlot,
    { sock_table::positions_for(capacity::SOCKETS) as usize },
    { aya_ebpf::bindings::BPF_F_MMAPABLE as usize },
> = Array::new();

// The socket table as older agents kept it (`sock_table_v1`): their pins
// when the agent found them, else one-entry stand-ins never read.
#[btf_map(name = "sock_cookies")]
pub static SOCK_COOKIES_V1: Array<sock_table_v1::SockBucket, 1> = Array::new();

#[btf_map(name = "sock_records")]
pub static SOCK_RECORDS_V1: Array<sock_table_v1::SocketState, 1> = Array::new();

#[btf_map(name = "sock_spills")]
pub static SOCK_SPILLS_V1: Array<u32, 1> = Array::new();

#[btf_map(name = "sock_counters")]
pub static SOCK_COUNTERS: PerCpuArray<u64, { sock_counter::COUNT as usize }> = PerCpuArray::new();
