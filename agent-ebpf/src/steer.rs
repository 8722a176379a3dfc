//! The connect-time decision (product.md, "Semantics"): leave the
//! connection alone, account it, or steer it to an eligible pod of the
//! service whose name the client resolved. The steps: what did this client
//! learn about the address, may it be steered at all (name kind, host
//! netns, policy, port), is the address still eligible for that service,
//! does the policy want a choice, and which pod. Anything unexpected leaves
//! the destination as the client asked (fail open).
use core::cell::Cell;

use aya_ebpf::{EbpfContext, helpers::bpf_get_netns_cookie};
use aya_log_ebpf::warn;
use headway_common::{
    AddrKey, Backend, BackendKey, STEERING_BACKENDS, STEERING_PORTS, ServiceEndpointKey,
    ServicePortKey, ServiceSteering, addr_filter, addr_slot_flags, check_word, config_flags, draw,
    endpoint_flags, name_kind, policy, port_word, service_flags, steer_counter, steering_backends,
    topology,
};

use crate::{
    accounting::{count_connect, count_decision, count_steer},
    dns::{KnownAddress, observation},
    kernel_log::{self, event},
    maps::{ADDR_FILTER, CONFIG, POD_STATS, SVC_BACKENDS, SVC_ENDPOINTS, SVC_PORTS, SVC_STEERING},
    sock_table::{Steering, cookie_of},
};

/// The fast path (product.md, rule 1): an address that was never a
/// headless service's pod cannot have been handed out by a headless name
/// either, so it needs no other lookup. A false positive of the filter
/// only costs the full path.
#[inline(always)]
pub fn never_known(dst: &AddrKey) -> bool {
    let (word, mask) = addr_filter::bits(dst);
    ADDR_FILTER.get(word).is_some_and(|w| *w & mask != mask)
}

const IPPROTO_UDP: u32 = 17;

/// A connect() or datagram as the hook saw it.
pub struct Request {
    pub dst: AddrKey,
    /// Destination port, host byte order.
    pub port: u16,
    pub protocol: u32,
    /// The socket's cookie once asked for (0: not yet). Read only when
    /// needed (a steering, a socket record): the fast path never calls the
    /// helper.
    pub cookie: Cell<u64>,
}

impl Request {
    /// The socket's cookie, read through the helper the first time.
    #[inline(always)]
    pub fn cookie<C: EbpfContext>(&self, ctx: &C) -> u64 {
        let mut cookie = self.cookie.get();
        if cookie == 0 {
            cookie = cookie_of(ctx);
            self.cookie.set(cookie);
        }
        cookie
    }
}

/// A pod the policy chose for a request (possibly the one asked for).
struct Choice {
    backend: Backend,
    /// The chosen address differs from the one asked for.
    moved: bool,
    /// The service whose name the client resolved.
    service_id: u32,
}

/// Where a connect() goes, as decided and accounted.
pub struct Connect {
    /// Where the connection goes instead of the address asked for, if it
    /// is steered.
    pub steered: Option<Steering>,
    /// The pod the connection goes to, if it goes to one.
    pub pod: Option<u32>,
}

/// Accounts a connect() and says where it goes.
#[inline(always)]
pub fn on_connect<C: EbpfContext>(ctx: &C, req: &Request) -> Connect {
    if never_known(&req.dst) {
        return Connect {
            steered: None,
            pod: None,
        };
    }
    // The agent's index of the address: its pod and what DNS may have
    // taught about it, in one lookup. An address it does not index (gone
    // long ago) is no pod's and cannot have been learned.
    let known = KnownAddress::of(&req.dst);
    let pod = known.and_then(|k| k.pod());
    match decide(ctx, req, pod, known, true) {
        Some(c) if c.moved => {
            count_connect(c.backend.pod_id, req.protocol);
            count_steer(pod, c.backend.pod_id);
            Connect {
                steered: Some(Steering {
                    asked: req.dst,
                    chosen: c.backend.addr,
                    service_id: c.service_id,
                }),
                pod: Some(c.backend.pod_id),
            }
        }
        Some(c) => {
            let pod_id = pod.unwrap_or(c.backend.pod_id);
            count_connect(pod_id, req.protocol);
            Connect {
                steered: None,
                pod: Some(pod_id),
            }
        }
        None => {
            if let Some(pod_id) = pod {
                count_connect(pod_id, req.protocol);
            }
            Connect { steered: None, pod }
        }
    }
}

/// sendmsg on an unconnected UDP socket: a datagram to `req.dst`. Returns
/// the steering the socket should keep for that address when the policy
/// made a choice (even the address asked for, so that later datagrams stick
/// to it). Only a choice is counted (as one UDP connection), not every
/// datagram.
#[inline(always)]
pub fn on_sendmsg<C: EbpfContext>(ctx: &C, req: &Request) -> Option<Steering> {
    if never_known(&req.dst) {
        return None;
    }
    let known = KnownAddress::of(&req.dst);
    let pod = known.and_then(|k| k.pod());
    let c = decide(ctx, req, pod, known, false)?;
    count_connect(c.backend.pod_id, IPPROTO_UDP);
    if c.moved {
        count_steer(pod, c.backend.pod_id);
    }
    Some(Steering {
        asked: req.dst,
        chosen: c.backend.addr,
        service_id: c.service_id,
    })
}

/// Whether `addr` is still an eligible pod of service `service_id` (a
/// socket that keeps a choice checks it before reusing it).
#[inline(always)]
pub fn still_eligible(service_id: u32, addr: &AddrKey) -> bool {
    let key = ServiceEndpointKey {
        service_id,
        _pad: 0,
        addr: *addr,
    };
    // SAFETY: copied out at once.
    unsafe { SVC_ENDPOINTS.get(&key) }.is_some_and(|ep| ep.flags & endpoint_flags::ELIGIBLE != 0)
}

#[inline(always)]
fn decide<C: EbpfContext>(
    ctx: &C,
    req: &Request,
    pod: Option<u32>,
    known: Option<KnownAddress>,
    count_kept: bool,
) -> Option<Choice> {
    // Decisions that make no choice are counted per connect, not per
    // datagram (`count_kept` is false for sendmsg).
    let kept = |service: Option<u32>, reason: u32| {
        if count_kept {
            count_decision(service, reason);
        }
    };
    // SAFETY: the helper only reads the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(learned) = known.and_then(|k| observation(netns_cookie, &req.dst, &k)) else {
        // Never resolved by this client (a hard-coded IP, a scraper using
        // API addresses, a cache older than the agent): never steered.
        if pod.is_some() {
            kept(None, steer_counter::KEPT_NO_DNS);
        }
        return None;
    };
    let obs = learned.observation;
    let service_id = obs.service_id;
    if obs.kind != name_kind::SERVICE {
        kept(Some(service_id), steer_counter::KEPT_POD_NAME);
        return None;
    }
    if is_host_netns(netns_cookie) {
        kept(Some(service_id), steer_counter::KEPT_HOST_NETNS);
        return None;
    }
    let service = Service::of(service_id)?;
    if service.policy == policy::OBSERVE {
        kept(Some(service_id), steer_counter::KEPT_OBSERVE);
        return None;
    }
    if !port_declared(service_id, &service, req) {
        kept(Some(service_id), steer_counter::KEPT_PORT);
        return None;
    }

    // Is the address still an eligible pod of the service it was resolved
    // for? If not, why not.
    let (member, eligible) = endpoint_state(service_id, &req.dst, learned.flags);
    let reason = if eligible {
        if service.policy == policy::FAILOVER {
            kept(Some(service_id), steer_counter::KEPT_ELIGIBLE);
            return None;
        }
        steer_counter::STEERED_BALANCED
    } else if member {
        steer_counter::STEERED_NOT_ELIGIBLE
    } else if pod.is_some() {
        steer_counter::STEERED_REUSED
    } else {
        steer_counter::STEERED_GONE
    };

    let draw = Draw::of(req.cookie(ctx));
    let Some(backend) = choose(service_id, &service, is_v4_mapped(&req.dst), draw) else {
        kept(Some(service_id), steer_counter::NO_ELIGIBLE_POD);
        if kernel_log::due(event::NO_ELIGIBLE_POD) {
            log_no_eligible_pod(ctx, service_id, &req.dst);
        }
        return None;
    };
    let moved = backend.addr != req.dst;
    let reason = if moved {
        reason
    } else {
        steer_counter::KEPT_BALANCED
    };
    count_decision(Some(service_id), reason);
    Some(Choice {
        backend,
        moved,
        service_id,
    })
}

/// The log line for a fail-open connect (see `kernel_log`). The service
/// is named by id: `headway status --json` maps ids to names.
#[inline(never)]
fn log_no_eligible_pod<C: EbpfContext>(ctx: &C, service_id: u32, dst: &AddrKey) {
    if is_v4_mapped(dst) {
        warn!(
            ctx,
            "service id {}: no eligible pod; a connect to {:i} went to the address asked for",
            service_id,
            u32::from_be(dst.addr[3])
        );
    } else {
        warn!(
            ctx,
            "service id {}: no eligible pod; a connect to {:i} went to the address asked for",
            service_id,
            dst.octets()
        );
    }
}

/// Whether `addr` is an endpoint of service `service_id` now, and whether
/// an eligible one: from the flags of its slot there when the agent wrote
/// them, else from `svc_endpoints`.
#[inline(always)]
fn endpoint_state(service_id: u32, addr: &AddrKey, slot_flags: u16) -> (bool, bool) {
    if slot_flags & addr_slot_flags::KNOWN != 0 {
        return (
            slot_flags & addr_slot_flags::MEMBER != 0,
            slot_flags & addr_slot_flags::ELIGIBLE != 0,
        );
    }
    let key = ServiceEndpointKey {
        service_id,
        _pad: 0,
        addr: *addr,
    };
    // SAFETY: copied out at once.
    match unsafe { SVC_ENDPOINTS.get(&key) }.copied() {
        Some(ep) => (true, ep.flags & endpoint_flags::ELIGIBLE != 0),
        None => (false, false),
    }
}

/// A service as connect() reads it from its `svc_steering` entry: the
/// fields of the first line copied once, the ports and the inline
/// choice-table slots read through the pointer when needed (a copy of the
/// whole 128-byte entry would cost stack the hooks do not have).
struct Service {
    entry: *const ServiceSteering,
    policy: u32,
    topology: u32,
    backends_v4: u32,
    backends_v6: u32,
    preferred_v4: u32,
    preferred_v6: u32,
    flags: u32,
}

impl Service {
    /// Service `service_id`'s entry, if a service has the id.
    #[inline(always)]
    fn of(service_id: u32) -> Option<Service> {
        let entry = SVC_STEERING.get_ptr(service_id)?;
        // SAFETY: aligned u32 fields of a live array value (rewritten in
        // place by the agent: each read once, see `service_steering`).
        let read = |field: *const u32| unsafe { core::ptr::read_volatile(field) };
        // SAFETY: field pointers into the same value.
        unsafe {
            if read(&raw const (*entry).live) == 0 {
                return None;
            }
            Some(Service {
                entry,
                policy: read(&raw const (*entry).policy),
                topology: read(&raw const (*entry).topology),
                backends_v4: read(&raw const (*entry).backends_v4),
                backends_v6: read(&raw const (*entry).backends_v6),
                preferred_v4: read(&raw const (*entry).preferred_v4),
                preferred_v6: read(&raw const (*entry).preferred_v6),
                flags: read(&raw const (*entry).flags),
            })
        }
    }

    /// Declared port word `i` (0 past the last).
    #[inline(always)]
    fn port(&self, i: usize) -> u32 {
        // SAFETY: an aligned u32 of the live value; `i` is in bounds.
        unsafe { core::ptr::read_volatile(&raw const (*self.entry).ports[i]) }
    }

    /// IPv4 choice-table slot `slot` from the entry's second line, if it
    /// carries that slot and the line's check agrees with the table sizes
    /// read from the first (a half-written entry: `None`, and the caller
    /// reads `svc_backends`).
    #[inline(always)]
    fn inline_v4(&self, slot: u32) -> Option<Backend> {
        let mut sum = steering_backends::sizes_mix(self.backends_v4, self.preferred_v4);
        let mut chosen = 0;
        for i in 0..STEERING_BACKENDS {
            // SAFETY: aligned words of the live value; `i` is in bounds.
            let word = unsafe { core::ptr::read_volatile(&raw const (*self.entry).backends[i]) };
            sum = sum.wrapping_add(steering_backends::mix(i, word));
            if i as u32 == slot {
                chosen = word;
            }
        }
        // SAFETY: as above.
        let check = unsafe { core::ptr::read_volatile(&raw const (*self.entry).backends_check) };
        (chosen != 0 && check == check_word::finish(sum))
            .then(|| steering_backends::backend(chosen))
    }
}

/// Whether `req` goes to a port the service declares (always, when it
/// declares none): from the ports its `svc_steering` entry carries, or
/// from `svc_ports` when they did not fit there.
#[inline(always)]
fn port_declared(service_id: u32, service: &Service, req: &Request) -> bool {
    if service.flags & service_flags::PORTS_DECLARED == 0 {
        return true;
    }
    if service.port(0) != 0 {
        let word = port_word(req.port, req.protocol as u8);
        return (0..STEERING_PORTS).any(|i| service.port(i) == word);
    }
    let key = ServicePortKey {
        service_id,
        port: req.port,
        protocol: req.protocol as u8,
        _pad: 0,
    };
    // SAFETY: only presence is checked.
    unsafe { SVC_PORTS.get(&key) }.is_some()
}

/// A socket's draw (`headway_common::draw`): no helper call, where
/// `bpf_get_prandom_u32` took ~7% of a steered connect()'s perf samples.
#[derive(Clone, Copy)]
struct Draw(u64);

impl Draw {
    #[inline(always)]
    fn of(cookie: u64) -> Draw {
        Draw(draw::mix(cookie))
    }

    #[inline(always)]
    fn below(self, n: u32, first: bool) -> u32 {
        draw::below(self.0, n, first)
    }
}

/// Draws a pod from the service's choice table for the address family: the
/// preferred (same node/zone) table when it has slots, else the one over
/// every eligible pod. Weights are already in the table (a pod holds slots
/// in proportion to its weight). `least-connections` draws two distinct
/// slots and keeps the pod with fewer active connections on this node.
#[inline(always)]
fn choose(service_id: u32, service: &Service, v4: bool, draw: Draw) -> Option<Backend> {
    let (family, all, preferred) = if v4 {
        (4, service.backends_v4, service.preferred_v4)
    } else {
        (6, service.backends_v6, service.preferred_v6)
    };
    let (base, n) = if preferred > 0 && service.topology != topology::NONE {
        (all, preferred)
    } else {
        (0, all)
    };
    if n == 0 {
        return None;
    }
    let first_slot = draw.below(n, true);
    let first = backend(service_id, service, family, base + first_slot)?;
    if service.policy != policy::LEAST_CONNECTIONS || n < 2 {
        return Some(first);
    }
    let offset = 1 + draw.below(n - 1, false);
    let second = backend(
        service_id,
        service,
        family,
        base + (first_slot + offset) % n,
    )?;
    if active_connections(second.pod_id) < active_connections(first.pod_id) {
        Some(second)
    } else {
        Some(first)
    }
}

/// A slot of a choice table: from the service's entry when it carries it
/// (the first IPv4 slots), else from `svc_backends`. A slot past the table
/// (mid-update) fails open.
#[inline(always)]
fn backend(service_id: u32, service: &Service, family: u32, slot: u32) -> Option<Backend> {
    if family == 4
        && (slot as usize) < STEERING_BACKENDS
        && let Some(backend) = service.inline_v4(slot)
    {
        return Some(backend);
    }
    let key = BackendKey {
        service_id,
        family,
        slot,
    };
    // SAFETY: copied out at once.
    unsafe { SVC_BACKENDS.get(&key) }.copied()
}

/// Established TCP connections from this node to the pod.
#[inline(always)]
fn active_connections(pod_id: u32) -> u64 {
    POD_STATS.get(pod_id).map_or(0, |c| c.active_tcp)
}

#[inline(always)]
fn is_host_netns(netns_cookie: u64) -> bool {
    match CONFIG.get(0) {
        Some(cfg) => {
            netns_cookie == cfg.host_netns_cookie && cfg.flags & config_flags::STEER_HOST_NETNS == 0
        }
        // No settings yet: treat every socket as the host's (fail open).
        None => true,
    }
}

#[inline(always)]
pub fn is_v4_mapped(addr: &AddrKey) -> bool {
    addr.addr[0] == 0 && addr.addr[1] == 0 && addr.addr[2] == AddrKey::V4_MAPPED_WORD
}
