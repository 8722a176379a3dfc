//! The observation cache in front of `dns_obs` (see
//! `headway_common::obs_cache`): `put` beside every stamp the interceptor
//! writes, `get` first in connect().
//!
//! An entry is four words written one by one, so a reader on another CPU
//! (or two writers of keys that share the entry) may leave words of two
//! writes side by side; the check covers the other three, so such an
//! entry fails it, and the reader then asks `dns_obs`.
use headway_common::obs_cache;

use crate::maps::DNS_OBS_CACHE;

/// Records `stamp` as the newest the client network namespace
/// `netns_cookie` has for `slot` of service `service_id`'s `family` (4 or
/// 6) addresses.
#[inline(always)]
pub fn put(netns_cookie: u64, service_id: u32, family: u16, slot: u16, stamp: u64) {
    let tag = obs_cache::tag(service_id, family, slot);
    let Some(e) = DNS_OBS_CACHE.get_ptr_mut(obs_cache::index(netns_cookie, tag)) else {
        return;
    };
    store!((*e).netns_cookie, netns_cookie);
    store!((*e).tag, tag);
    store!((*e).stamp, stamp);
    store!((*e).check, obs_cache::check(netns_cookie, tag, stamp));
}

/// The newest stamp the interceptor wrote for that slot in the client
/// network namespace `netns_cookie`, if the cache still holds it whole.
#[inline(always)]
pub fn get(netns_cookie: u64, service_id: u32, family: u16, slot: u16) -> Option<u64> {
    let tag = obs_cache::tag(service_id, family, slot);
    let e = DNS_OBS_CACHE.get_ptr(obs_cache::index(netns_cookie, tag))?;
    // Each word read once, in the order `put` writes them.
    let cookie = load!((*e).netns_cookie);
    let entry_tag = load!((*e).tag);
    let stamp = load!((*e).stamp);
    let check = load!((*e).check);
    (cookie == netns_cookie
        && entry_tag == tag
        && check == obs_cache::check(netns_cookie, tag, stamp))
    .then_some(stamp)
}
