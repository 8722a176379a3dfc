//! The cgroup_skb programs: every packet a socket of the cgroup sends or
//! receives passes one of them. Each does two things, in one run: the DNS
//! interceptor's part (`dns::query` on the way out, `dns::response` on the
//! way in) and the byte counters (`bytes`). One program per direction
//! rather than one per concern: every program run costs the packet a
//! dispatch, whatever the program then does.
use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};

use crate::{bytes, dns};

/// cgroup_skb verdict that lets the packet pass. The only one we return.
const ALLOW: i32 = 1;

#[cgroup_skb(egress)]
pub fn hw_skb_egress(ctx: SkBuffContext) -> i32 {
    dns::query::record_query(&ctx);
    bytes::count(&ctx.skb, true);
    ALLOW
}

#[cgroup_skb(ingress)]
pub fn hw_skb_ingress(ctx: SkBuffContext) -> i32 {
    dns::response::on_response(&ctx);
    bytes::count(&ctx.skb, false);
    ALLOW
}
