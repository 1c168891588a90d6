//! The kernel's iSCSI transport class over netlink (`NETLINK_ISCSI`), for the one request
//! the node service sends itself: stop a session's connection for recovery, as iscsid does
//! before it reconnects (see [`super::repair`] for why).
//!
//! Layout facts (the kernel's `include/scsi/iscsi_if.h`, native byte order):
//! - the request is a netlink header followed by a `struct iscsi_uevent`: `type` u32,
//!   `iferror` u32, `transport_handle` u64, then the request's union, for a stop
//!   `sid` u32, `cid` u32, `conn_handle` u64, `flag` u32;
//! - the kernel answers on the same socket with the event echoed back; when the request
//!   failed, its type is `ISCSI_KEVENT_IF_ERROR` and `iferror` holds `-errno`;
//! - `transport_handle` is the transport's `/sys/class/iscsi_transport/NAME/handle`.
//!
//! The socket works only in the host's network namespace (the node pod runs with
//! `hostNetwork`) and needs CAP_SYS_ADMIN (it is privileged).

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{recv, sendto, socket, sockopt, AddressFamily, RecvFlags, SendFlags, SocketType};

/// `ISCSI_UEVENT_STOP_CONN` (`ISCSI_UEVENT_BASE` 10 + 8).
const ISCSI_UEVENT_STOP_CONN: u32 = 18;
/// `ISCSI_KEVENT_IF_ERROR` (`ISCSI_KEVENT_BASE` 100 + 1): the request failed.
const ISCSI_KEVENT_IF_ERROR: u32 = 101;
/// `STOP_CONN_RECOVER`: stop for a reconnect (the session and its disks stay).
const STOP_CONN_RECOVER: u32 = 3;

/// Netlink header length (`NLMSG_HDRLEN`).
const NLMSG_HDRLEN: usize = 16;
/// Bytes sent after the header. `struct iscsi_uevent` is 56 bytes on x86-64 kernels; the
/// kernel drops a request shorter than its struct and ignores bytes past it, so the event is
/// padded generously rather than sized for one kernel.
const EVENT_LEN: usize = 256;
/// How long the kernel's answer is waited for.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The stop request for connection `cid` of session `sid`.
fn stop_request(transport_handle: u64, sid: u32, cid: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + EVENT_LEN);
    m.extend_from_slice(&((NLMSG_HDRLEN + EVENT_LEN) as u32).to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&(ISCSI_UEVENT_STOP_CONN as u16).to_ne_bytes()); // nlmsg_type
    m.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
    m.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel answers our port
    m.extend_from_slice(&ISCSI_UEVENT_STOP_CONN.to_ne_bytes()); // type
    m.extend_from_slice(&0u32.to_ne_bytes()); // iferror
    m.extend_from_slice(&transport_handle.to_ne_bytes());
    m.extend_from_slice(&sid.to_ne_bytes());
    m.extend_from_slice(&cid.to_ne_bytes());
    m.extend_from_slice(&0u64.to_ne_bytes()); // conn_handle (unused by the kernel)
    m.extend_from_slice(&STOP_CONN_RECOVER.to_ne_bytes());
    m.resize(NLMSG_HDRLEN + EVENT_LEN, 0);
    m
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
}

/// What the kernel's answer `reply` says: `None` when it is not an answer to a stop,
/// `Some(Ok)` done, `Some(Err)` refused with its errno. The kernel answers with the
/// request's message type and sequence number 0, on this socket only.
fn read_reply(reply: &[u8]) -> Option<io::Result<()>> {
    let nl_type = reply.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]))?;
    if u32::from(nl_type) != ISCSI_UEVENT_STOP_CONN {
        return None;
    }
    let kind = u32_at(reply, NLMSG_HDRLEN)?;
    if kind == ISCSI_KEVENT_IF_ERROR {
        let errno = u32_at(reply, NLMSG_HDRLEN + 4)? as i32;
        return Some(Err(io::Error::from_raw_os_error(errno.saturating_neg())));
    }
    Some(Ok(()))
}

/// The handle of transport `name` (`tcp`) under sysfs root `sys`.
pub fn transport_handle(sys: &Path, name: &str) -> io::Result<u64> {
    let p = sys.join("class/iscsi_transport").join(name).join("handle");
    std::fs::read_to_string(&p)?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display())))
}

fn open() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::NETLINK,
        SocketType::RAW,
        Some(netlink::ISCSI),
    )?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(REPLY_TIMEOUT))?;
    Ok(fd)
}

/// Stops connection `cid` of session `sid` for recovery and waits for the kernel's answer.
/// Blocking (a few system calls): call it from a blocking thread.
pub fn stop_conn_for_recovery(transport_handle: u64, sid: u32, cid: u32) -> io::Result<()> {
    let fd = open()?;
    let req = stop_request(transport_handle, sid, cid);
    sendto(&fd, &req, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))?;
    let mut buf = [0u8; 1024];
    loop {
        let (n, _) = recv(&fd, &mut buf[..], RecvFlags::empty())?;
        if let Some(answer) = read_reply(&buf[..n.min(buf.len())]) {
            return answer;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_request_places_the_fields_where_the_kernel_reads_them() {
        let m = stop_request(0x1122_3344_5566_7788, 7, 0);
        assert_eq!(m.len(), NLMSG_HDRLEN + EVENT_LEN);
        assert_eq!(u32_at(&m, 0), Some(272)); // nlmsg_len
        assert_eq!(&m[4..6], &18u16.to_ne_bytes()); // nlmsg_type
        assert_eq!(u32_at(&m, 16), Some(ISCSI_UEVENT_STOP_CONN));
        assert_eq!(&m[24..32], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!((u32_at(&m, 32), u32_at(&m, 36)), (Some(7), Some(0))); // sid, cid
        assert_eq!(u32_at(&m, 48), Some(STOP_CONN_RECOVER)); // flag, after conn_handle
        assert!(m[52..].iter().all(|b| *b == 0));
    }

    /// An answer as the kernel sends it (captured shape: 16-byte header, 56-byte event).
    fn reply(nl_type: u16, kind: u32, iferror: i32) -> Vec<u8> {
        let mut r = vec![0u8; 72];
        r[0..4].copy_from_slice(&72u32.to_ne_bytes());
        r[4..6].copy_from_slice(&nl_type.to_ne_bytes());
        r[16..20].copy_from_slice(&kind.to_ne_bytes());
        r[20..24].copy_from_slice(&iferror.to_ne_bytes());
        r
    }

    #[test]
    fn replies_read_as_done_refused_or_not_ours() {
        assert!(matches!(
            read_reply(&reply(18, ISCSI_UEVENT_STOP_CONN, 0)),
            Some(Ok(()))
        ));
        let refused = read_reply(&reply(18, ISCSI_KEVENT_IF_ERROR, -22));
        assert_eq!(
            refused.and_then(|r| r.err()).and_then(|e| e.raw_os_error()),
            Some(22)
        );
        assert!(read_reply(&reply(2, 0, 0)).is_none()); // NLMSG_ERROR
        assert!(read_reply(&[0u8; 10]).is_none());
    }

    #[test]
    fn transport_handle_reads_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("class/iscsi_transport/tcp");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join("handle"), "18446744072642343008\n").unwrap();
        assert_eq!(
            transport_handle(d.path(), "tcp").unwrap(),
            18_446_744_072_642_343_008
        );
        assert_eq!(
            transport_handle(d.path(), "iser").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
