//! The network namespace the agent runs in. On a node the agent runs with
//! hostNetwork, so this is the host's: the kernel programs tell host
//! sockets (kubelet probes, node agents) from pods' by this cookie.
use std::{io, net::UdpSocket, os::fd::AsRawFd};

/// `SO_NETNS_COOKIE` from asm-generic/socket.h (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the current network namespace, the same value
/// `bpf_get_netns_cookie` returns for sockets in it.
pub fn current_netns_cookie() -> io::Result<u64> {
    // Any socket will do; it is not bound or connected.
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of exactly the size we pass.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cookie_is_stable_and_nonzero() {
        let a = super::current_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, super::current_netns_cookie().unwrap());
    }
}
