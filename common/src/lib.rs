//! The layout of every map headway pins, shared by the kernel programs and
//! the agent. Everything here is `#[repr(C)]` with explicit padding and no
//! `bool`/`Option`, so both sides (and bpftool, through BTF) agree on it.
//!
//! Addresses are stored as 16 bytes in network byte order, viewed as four
//! `u32` words the way the socket hooks see them: IPv6 as is, IPv4 as an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). One map then serves both
//! families.
#![no_std]

/// Directory under the bpffs mount where headway pins its maps and links.
pub const PIN_DIR: &str = "headway";

/// Names of the pinned maps. A BPF object name holds at most 15 bytes.
pub mod map_names {
    /// [`crate::AddrKey`] → [`crate::PodRef`]: every address of a pod behind
    /// a headless service. The connect hooks' fast path is one lookup here.
    pub const POD_ADDRS: &str = "pod_addrs";
    /// pod id → [`crate::PodCounters`], updated by the kernel.
    pub const POD_STATS: &str = "pod_stats";
    /// pod id → [`crate::PodMeta`], written by the agent for `status`.
    pub const PODS: &str = "pods";
    /// service id → [`crate::ServiceMeta`], written by the agent.
    pub const SERVICES: &str = "services";
    /// [`crate::ServiceEndpointKey`] → [`crate::EndpointState`]: which pod
    /// addresses belong to which service, and in what state.
    pub const SVC_ENDPOINTS: &str = "svc_endpoints";

    /// Every map the agent pins, in the order `status` reads them.
    pub const ALL: [&str; 5] = [POD_ADDRS, POD_STATS, PODS, SERVICES, SVC_ENDPOINTS];
}

/// Names of the kernel programs; links are pinned as `link_<program>`.
pub mod program_names {
    pub const CONNECT4: &str = "hw_connect4";
    pub const CONNECT6: &str = "hw_connect6";

    pub const ALL: [&str; 2] = [CONNECT4, CONNECT6];
}

/// Default capacities, sized for 65,536 endpoints cluster-wide.
pub mod capacity {
    pub const POD_ADDRS: u32 = 65_536;
    pub const PODS: u32 = 65_536;
    pub const SERVICES: u32 = 16_384;
    pub const SVC_ENDPOINTS: u32 = 131_072;
}

pub const NAMESPACE_LEN: usize = 64;
pub const SERVICE_NAME_LEN: usize = 64;
pub const POD_NAME_LEN: usize = 128;

/// An address as the socket hooks see it (see the crate docs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: [u32; 4],
}

impl AddrKey {
    /// The second word of an IPv4-mapped address (`0000:ffff`) as it lies in
    /// memory on a little-endian machine (BPF is little-endian here).
    pub const V4_MAPPED_WORD: u32 = 0xffff_0000;

    /// `ip` in network byte order, as `bpf_sock_addr.user_ip4` holds it.
    #[inline(always)]
    pub const fn from_v4_be(ip: u32) -> Self {
        AddrKey {
            addr: [0, 0, Self::V4_MAPPED_WORD, ip],
        }
    }

    #[inline(always)]
    pub const fn from_v6_words(words: [u32; 4]) -> Self {
        AddrKey { addr: words }
    }

    /// From the 16 bytes of an address in network order.
    pub fn from_octets(o: [u8; 16]) -> Self {
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        AddrKey {
            addr: [w(0), w(4), w(8), w(12)],
        }
    }

    /// The 16 bytes of the address in network order.
    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.addr[i].to_ne_bytes();
            out[i * 4] = b[0];
            out[i * 4 + 1] = b[1];
            out[i * 4 + 2] = b[2];
            out[i * 4 + 3] = b[3];
            i += 1;
        }
        out
    }
}

/// What the kernel needs to know about a pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRef {
    /// Key of the pod's counters in `pod_stats`.
    pub pod_id: u32,
    pub _pad: u32,
}

/// Per-pod counters. The kernel adds to them atomically; the agent only
/// creates the entry (zeroed) and deletes it when the pod is long gone, so
/// the counts survive agent restarts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// connect() calls on TCP sockets towards this pod.
    pub tcp_connects: u64,
    /// connect() calls on UDP sockets towards this pod.
    pub udp_connects: u64,
    /// Established TCP connections open right now.
    pub active_tcp: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Connections steered to this pod from another address.
    pub steered_in: u64,
    /// Connections steered away from this pod.
    pub steered_away: u64,
    /// DNS answers that handed this pod's address out.
    pub dns_answers: u64,
}

/// State bits of a pod as an endpoint of one service.
pub mod endpoint_flags {
    pub const READY: u32 = 1 << 0;
    pub const SERVING: u32 = 1 << 1;
    pub const TERMINATING: u32 = 1 << 2;
    pub const DRAINED: u32 = 1 << 3;
}

/// Key of `svc_endpoints`: one pod address as an endpoint of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceEndpointKey {
    pub service_id: u32,
    pub _pad: u32,
    pub addr: AddrKey,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointState {
    pub pod_id: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
}

/// Steering policy of a service (`headway.dev/policy`).
pub mod policy {
    pub const OBSERVE: u32 = 0;
    pub const FAILOVER: u32 = 1;
    pub const RANDOM: u32 = 2;
    pub const LEAST_CONNECTIONS: u32 = 3;
    pub const WEIGHTED: u32 = 4;
}

/// Topology preference of a service (`headway.dev/topology`).
pub mod topology {
    pub const NONE: u32 = 0;
    pub const PREFER_NODE: u32 = 1;
    pub const PREFER_ZONE: u32 = 2;
}

/// A headless service as `status` shows it. Names are NUL-padded UTF-8.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    pub namespace: [u8; NAMESPACE_LEN],
    pub name: [u8; SERVICE_NAME_LEN],
    /// [`policy`] value.
    pub policy: u32,
    /// [`topology`] value.
    pub topology: u32,
}

/// A pod as `status` shows it. Names are NUL-padded UTF-8 (truncated when
/// longer than the field). Its addresses are the keys of `pod_addrs` that
/// point at it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: [u8; NAMESPACE_LEN],
    pub name: [u8; POD_NAME_LEN],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, made of integers only and
    // have no implicit padding, so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::PodRef {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::ServiceEndpointKey {}
    unsafe impl aya::Pod for super::EndpointState {}
    unsafe impl aya::Pod for super::ServiceMeta {}
    unsafe impl aya::Pod for super::PodMeta {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_key_matches_octets() {
        let ip = u32::from_ne_bytes([10, 1, 2, 3]);
        let key = AddrKey::from_v4_be(ip);
        let mut want = [0u8; 16];
        want[10] = 0xff;
        want[11] = 0xff;
        want[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(key.octets(), want);
        assert_eq!(AddrKey::from_octets(want), key);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<AddrKey>(), 16);
        assert_eq!(size_of::<PodRef>(), 8);
        assert_eq!(size_of::<PodCounters>(), 64);
        assert_eq!(size_of::<ServiceEndpointKey>(), 24);
        assert_eq!(size_of::<EndpointState>(), 8);
        assert_eq!(size_of::<ServiceMeta>(), 64 + 64 + 8);
        assert_eq!(size_of::<PodMeta>(), 64 + 128);
    }
}
