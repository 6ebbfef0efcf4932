//! The end user's address behind proxies, for IP lockouts. `X-Forwarded-For` is believed only
//! as far as it was written by proxies the operator trusts (`--trusted-proxies`): walking from
//! the right (the hop nearest to us), trusted addresses are skipped and the first address that
//! is not trusted is the client. A client cannot forge its way past that: whatever it writes
//! lands to the left of the address its first trusted proxy saw.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::verify::ClientIp;

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl Default for TrustedProxies {
    /// Loopback only: a proxy on the same host (the usual sidecar and test set-up).
    fn default() -> Self {
        Self(vec![
            "127.0.0.0/8".parse().expect("a valid network"),
            "::1/128".parse().expect("a valid network"),
        ])
    }
}

impl TrustedProxies {
    /// Addresses or networks, comma separated (`10.0.0.0/8, 192.168.1.7`); `none` trusts none.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("none") {
            return Ok(Self(Vec::new()));
        }
        text.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("trusted proxy {item:?} is not an address or a network"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    fn trusts(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|network| network.contains(&address))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy, in which case the
    /// nearest untrusted hop of `forwarded_for` (every `X-Forwarded-For` value, in order).
    pub fn client_address<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> ClientIp {
        let mut client = peer;
        if self.trusts(peer) {
            let hops = forwarded_for.rev().flat_map(|value| value.rsplit(','));
            for hop in hops {
                // A hop we cannot read ends the walk at the last address we could.
                let Some(address) = hop_address(hop) else {
                    break;
                };
                client = address;
                if !self.trusts(address) {
                    break;
                }
            }
        }
        ClientIp::from(client.to_canonical())
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:80`, `[::1]:80`).
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(address) = hop.parse::<IpAddr>() {
        return Some(address);
    }
    if let Ok(socket) = hop.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    let bracketed = hop.strip_prefix('[')?.split(']').next()?;
    bracketed.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn client(proxies: &TrustedProxies, peer: &str, forwarded: &[&str]) -> ClientIp {
        proxies.client_address(ip(peer), forwarded.iter().copied())
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 127.0.0.1").unwrap();
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            client(&proxies, "203.0.113.9", &["198.51.100.1"]),
            ClientIp::from(ip("203.0.113.9"))
        );
        // A trusted peer: the nearest untrusted hop; what the client wrote to its left is ignored.
        assert_eq!(
            client(
                &proxies,
                "127.0.0.1",
                &["6.6.6.6, 198.51.100.7", "10.1.2.3"]
            ),
            ClientIp::from(ip("198.51.100.7"))
        );
        // Ports and brackets are read; IPv4-mapped addresses are their IPv4 address.
        assert_eq!(
            client(&proxies, "::ffff:10.0.0.1", &["[2001:db8::1]:443"]),
            ClientIp::from(ip("2001:db8::1"))
        );
        assert_eq!(
            client(&proxies, "10.0.0.1", &["198.51.100.7:5000"]),
            ClientIp::from(ip("198.51.100.7"))
        );
        // Nothing forwarded: the trusted peer itself.
        assert_eq!(
            client(&proxies, "10.0.0.1", &[]),
            ClientIp::from(ip("10.0.0.1"))
        );
        // Garbage stops the walk at the last address read.
        assert_eq!(
            client(&proxies, "127.0.0.1", &["junk, 10.0.0.2"]),
            ClientIp::from(ip("10.0.0.2"))
        );
    }

    #[test]
    fn the_list_parses_or_says_what_is_wrong() {
        assert_eq!(TrustedProxies::parse("none").unwrap().0, []);
        assert_eq!(TrustedProxies::parse("").unwrap().0, []);
        assert!(
            TrustedProxies::parse("10.0.0.0/33")
                .unwrap_err()
                .contains("10.0.0.0/33")
        );
        assert!(TrustedProxies::parse("proxy.local").is_err());
        assert!(TrustedProxies::default().trusts(ip("127.0.0.2")));
        assert!(TrustedProxies::default().trusts(ip("::ffff:127.0.0.1")));
        assert!(!TrustedProxies::default().trusts(ip("10.0.0.1")));
    }
}
