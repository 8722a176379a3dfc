//! The connect-time decision (product.md, "Semantics"): leave the
//! connection alone, account it, or steer it to an eligible pod of the
//! service whose name the client resolved. Four small steps: what did this
//! client learn about the address, may it be steered, is the address still
//! eligible for that service, and which pod instead. Anything unexpected
//! leaves the destination as the client asked (fail open).
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32},
};
use headway_common::{
    AddrKey, BackendKey, ObservationKey, ServiceEndpointKey, config_flags, endpoint_flags,
    name_kind, policy, steer_counter,
};

use crate::{
    accounting::{count_connect, count_decision, count_steer, pod_of},
    maps::{CONFIG, DNS_OBS, SERVICES, SVC_BACKENDS, SVC_ENDPOINTS},
};

/// Accounts a connect() to `dst` and returns the address to use instead,
/// if the connection is steered.
#[inline(always)]
pub fn on_connect<C: EbpfContext>(ctx: &C, dst: &AddrKey, protocol: u32) -> Option<AddrKey> {
    let pod = pod_of(dst);
    match decide(ctx, dst, pod, true) {
        Some((new_addr, new_pod)) => {
            count_connect(new_pod, protocol);
            count_steer(pod, new_pod);
            Some(new_addr)
        }
        None => {
            if let Some(pod_id) = pod {
                count_connect(pod_id, protocol);
            }
            None
        }
    }
}

#[inline(always)]
fn decide<C: EbpfContext>(
    ctx: &C,
    dst: &AddrKey,
    pod: Option<u32>,
    count_kept: bool,
) -> Option<(AddrKey, u32)> {
    // Decisions that leave the destination alone are counted per connect,
    // not per datagram (`count_kept` is false for sendmsg).
    let kept = |service: Option<u32>, reason: u32| {
        if count_kept {
            count_decision(service, reason);
        }
    };
    // SAFETY: the helper only reads the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = ObservationKey {
        netns_cookie,
        addr: *dst,
    };
    // SAFETY: copied out at once.
    let Some(obs) = (unsafe { DNS_OBS.get(&key) }).copied() else {
        // Never resolved by this client (a hard-coded IP, a scraper using
        // API addresses, a cache older than the agent): never steered.
        if pod.is_some() {
            kept(None, steer_counter::KEPT_NO_DNS);
        }
        return None;
    };
    if obs.kind != name_kind::SERVICE {
        kept(Some(obs.service_id), steer_counter::KEPT_POD_NAME);
        return None;
    }
    if is_host_netns(netns_cookie) {
        kept(Some(obs.service_id), steer_counter::KEPT_HOST_NETNS);
        return None;
    }
    // SAFETY: copied out at once.
    let service = (unsafe { SERVICES.get(obs.service_id) }).copied()?;
    if service.policy == policy::OBSERVE {
        kept(Some(obs.service_id), steer_counter::KEPT_OBSERVE);
        return None;
    }

    // Failover: only an address that is no longer eligible for the service
    // the client resolved moves.
    let member = ServiceEndpointKey {
        service_id: obs.service_id,
        _pad: 0,
        addr: *dst,
    };
    // SAFETY: copied out at once.
    let reason = match (unsafe { SVC_ENDPOINTS.get(&member) }).copied() {
        Some(ep) if ep.flags & endpoint_flags::ELIGIBLE != 0 => return None,
        Some(_) => steer_counter::STEERED_NOT_ELIGIBLE,
        None if pod.is_some() => steer_counter::STEERED_REUSED,
        None => steer_counter::STEERED_GONE,
    };

    let (family, count) = if is_v4_mapped(dst) {
        (4, service.backends_v4)
    } else {
        (6, service.backends_v6)
    };
    if count == 0 {
        kept(Some(obs.service_id), steer_counter::NO_ELIGIBLE_POD);
        return None;
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % count;
    let backend = BackendKey {
        service_id: obs.service_id,
        family,
        slot,
    };
    // A slot past the table (mid-update) or an address without a pod both
    // fail open.
    // SAFETY: copied out at once.
    let Some(new_addr) = (unsafe { SVC_BACKENDS.get(&backend) }).copied() else {
        kept(Some(obs.service_id), steer_counter::NO_ELIGIBLE_POD);
        return None;
    };
    let Some(new_pod) = pod_of(&new_addr) else {
        kept(Some(obs.service_id), steer_counter::NO_ELIGIBLE_POD);
        return None;
    };
    count_decision(Some(obs.service_id), reason);
    Some((new_addr, new_pod))
}

/// sendmsg on an unconnected UDP socket: a datagram to `dst`. Returns the
/// address to send to instead, if steered; only a steering is counted (as
/// one UDP connection to the chosen pod), not every datagram.
#[inline(always)]
pub fn on_sendmsg<C: EbpfContext>(ctx: &C, dst: &AddrKey) -> Option<AddrKey> {
    let pod = pod_of(dst);
    let (new_addr, new_pod) = decide(ctx, dst, pod, false)?;
    count_connect(new_pod, IPPROTO_UDP);
    count_steer(pod, new_pod);
    Some(new_addr)
}

const IPPROTO_UDP: u32 = 17;

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
