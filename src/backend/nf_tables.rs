//! The nf_tables tables of the current namespace, listed over netlink in this
//! process: the same `table FAMILY NAME` lines as `nft list tables` prints.
//!
//! After every apply, meshinit looks for rules of ours left by another backend.
//! For nf_tables (native nft, iptables-nft) that look started `nft list tables`,
//! a process of several milliseconds, although in a pod it almost always finds
//! nothing; the iptables-nft backend ran it before each apply, too, to know which
//! of its tables exist. One `NFT_MSG_GETTABLE` dump on a netlink socket answers
//! the same question in well under a millisecond. When the dump fails (no
//! nf_tables in the kernel, no permission, a dump interrupted by a concurrent
//! change), callers fall back to running `nft`, as before.
//!
//! The socket is created on the calling thread, so it lives in the namespace
//! that thread entered (`--netns`).

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFTA_TABLE_NAME: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// nlmsghdr (16 bytes) + nfgenmsg (4 bytes).
const HEADER: usize = 20;
/// Sequence number of our one request; replies to anything else are ignored.
const SEQ: u32 = 1;
/// Ends a listing that never says "done" (a kernel would not, but the loop is
/// bounded all the same): far more tables than any namespace holds.
const MAX_TABLES: usize = 100_000;

/// Lists the tables as `table FAMILY NAME\n` lines, in the kernel's order.
pub fn list_tables() -> Result<String, String> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|err| format!("netlink socket: {err}"))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|err| format!("netlink bind: {err}"))?;
    send(fd.as_raw_fd(), &request(), MsgFlags::empty())
        .map_err(|err| format!("netlink send: {err}"))?;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut listing = Listing::default();
    loop {
        let n = recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty())
            .map_err(|err| format!("netlink receive: {err}"))?;
        if listing.read(buffer.get(..n).unwrap_or_default())? {
            return Ok(listing.lines);
        }
        if listing.count > MAX_TABLES {
            return Err(format!("more than {MAX_TABLES} tables listed"));
        }
    }
}

/// The dump request: every table of every family.
fn request() -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER);
    message.extend_from_slice(&(HEADER as u32).to_ne_bytes());
    message.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message.extend_from_slice(&SEQ.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: NFPROTO_UNSPEC (all families), NFNETLINK_V0, resource id 0.
    message.extend_from_slice(&[0, 0, 0, 0]);
    message
}

/// The tables read so far from the dump's datagrams.
#[derive(Default)]
struct Listing {
    lines: String,
    count: usize,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

impl Listing {
    /// Reads one datagram of netlink messages; true once the dump is done.
    fn read(&mut self, mut datagram: &[u8]) -> Result<bool, String> {
        while !datagram.is_empty() {
            let truncated = || "a truncated netlink message".to_string();
            let len = u32_at(datagram, 0).ok_or_else(truncated)? as usize;
            let kind = u16_at(datagram, 4).ok_or_else(truncated)?;
            let flags = u16_at(datagram, 6).ok_or_else(truncated)?;
            let seq = u32_at(datagram, 8).ok_or_else(truncated)?;
            let message = datagram
                .get(..len)
                .filter(|_| len >= 16)
                .ok_or_else(truncated)?;
            datagram = datagram.get(align(len)..).unwrap_or_default();
            if seq != SEQ {
                continue;
            }
            if flags & NLM_F_DUMP_INTR != 0 {
                return Err("the table dump was interrupted by a concurrent change".to_string());
            }
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = u32_at(message, 16).ok_or_else(truncated)? as i32;
                    if errno == 0 {
                        continue;
                    }
                    return Err(format!(
                        "the kernel refused the table dump: {}",
                        std::io::Error::from_raw_os_error(-errno)
                    ));
                }
                kind if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE => {
                    self.table(message)?;
                }
                _ => {}
            }
        }
        Ok(false)
    }

    /// One table's message: nfgenmsg's family, then the NFTA_TABLE_NAME attribute.
    fn table(&mut self, message: &[u8]) -> Result<(), String> {
        let family = *message
            .get(16)
            .ok_or("a table message without its family")?;
        let mut attributes = message.get(HEADER..).unwrap_or_default();
        while let (Some(len), Some(kind)) = (u16_at(attributes, 0), u16_at(attributes, 2)) {
            let len = usize::from(len);
            let value = attributes
                .get(4..len)
                .ok_or("a truncated netlink attribute")?;
            if kind & NLA_TYPE_MASK == NFTA_TABLE_NAME {
                let name = value.split(|&b| b == 0).next().unwrap_or_default();
                let name =
                    std::str::from_utf8(name).map_err(|_| "a table name that is not UTF-8")?;
                self.lines
                    .push_str(&format!("table {} {name}\n", family_name(family)));
                self.count += 1;
                return Ok(());
            }
            attributes = attributes.get(align(len.max(4))..).unwrap_or_default();
        }
        Err("a table message without a name".to_string())
    }
}

/// The family as nft names it.
fn family_name(family: u8) -> String {
    match family {
        1 => "inet".to_string(),
        2 => "ip".to_string(),
        3 => "arp".to_string(),
        5 => "netdev".to_string(),
        7 => "bridge".to_string(),
        10 => "ip6".to_string(),
        other => format!("family-{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align(out.len()), 0);
        out
    }

    fn table(family: u8, name: &str) -> Vec<u8> {
        let mut payload = vec![family, 0, 0, 0];
        // An attribute before the name, as the kernel may send (NFTA_TABLE_FLAGS).
        payload.extend_from_slice(&8u16.to_ne_bytes());
        payload.extend_from_slice(&2u16.to_ne_bytes());
        payload.extend_from_slice(&0u32.to_ne_bytes());
        let value = format!("{name}\0");
        payload.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
        payload.extend_from_slice(value.as_bytes());
        payload.resize(align(payload.len()), 0);
        message(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE,
            2,
            SEQ,
            &payload,
        )
    }

    #[test]
    fn tables_are_read_as_nft_list_tables_prints_them() {
        let mut listing = Listing::default();
        let first = [table(2, "nat"), table(1, "meshinit")].concat();
        assert!(!listing.read(&first).unwrap());
        let second = [table(10, "mangle"), message(NLMSG_DONE, 2, SEQ, &[0; 4])].concat();
        assert!(listing.read(&second).unwrap());
        assert_eq!(
            listing.lines,
            "table ip nat\ntable inet meshinit\ntable ip6 mangle\n"
        );
    }

    #[test]
    fn errors_and_garbage_are_errors_not_panics() {
        let mut listing = Listing::default();
        let refused = message(NLMSG_ERROR, 0, SEQ, &(-1i32).to_ne_bytes());
        assert!(listing
            .read(&refused)
            .unwrap_err()
            .contains("refused the table dump"));
        let interrupted = message(NLMSG_DONE, NLM_F_DUMP_INTR, SEQ, &[0; 4]);
        assert!(listing.read(&interrupted).is_err());
        for garbage in [
            &[1u8, 2, 3][..],
            &[200, 0, 0, 0, 0, 10, 0, 0][..],
            &[0; 16][..],
        ] {
            assert!(Listing::default().read(garbage).is_err());
        }
        let nameless = message(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE,
            0,
            SEQ,
            &[2, 0, 0, 0],
        );
        assert!(Listing::default().read(&nameless).is_err());
        // Another request's reply is skipped.
        let other = [table(2, "nat")].concat();
        let mut skipped = other.clone();
        skipped[8..12].copy_from_slice(&7u32.to_ne_bytes());
        let mut listing = Listing::default();
        assert!(!listing.read(&skipped).unwrap());
        assert!(listing.lines.is_empty());
    }
}
