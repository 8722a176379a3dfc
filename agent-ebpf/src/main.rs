//! headway's kernel programs. Each hook lives in its own module; the maps
//! they share are declared in `maps`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod accounting;
mod bytes;
mod connect;
mod dns;
mod kernel_log;
mod maps;
mod release;
mod sendmsg;
mod skb;
mod sock_addr;
mod sock_ops;
mod sock_table;
mod sock_table_v1;
mod steer;
mod transparency;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists
    // only to satisfy the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
