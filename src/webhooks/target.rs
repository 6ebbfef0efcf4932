//! Where a webhook may point. A webhook makes this server send HTTP requests to an address a
//! caller chose: without these rules anyone allowed to create one could reach the cloud metadata
//! service, this server's own ports, or anything on the private network behind it (SSRF).
//!
//! - Always refused: this server's own listening addresses, the unspecified address, link-local
//!   addresses (which hold the cloud metadata services, 169.254.169.254 and fe80::/10), known
//!   metadata addresses outside them, multicast, broadcast and reserved ranges.
//! - Refused unless the operator allows private targets: loopback, private (RFC 1918, unique
//!   local), carrier-grade NAT and other special-purpose ranges.
//!
//! The rules hold at creation (for an address, or every address a name resolves to) and again
//! at every delivery: names are resolved by `GuardedResolver`, which drops forbidden addresses,
//! so a name that later resolves elsewhere (DNS rebinding) reaches nothing forbidden. IPv4
//! addresses written as IPv6 (`::ffff:127.0.0.1`) are judged as the IPv4 address they are.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use url::{Host, Url};

use crate::error::{Error, Result};

/// The longest webhook URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// How long creating a webhook waits for its host name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Metadata services outside the link-local ranges (which are refused as a whole).
const METADATA_ADDRESSES: [IpAddr; 3] = [
    // Alibaba Cloud.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // Oracle Cloud (also 169.254.169.254).
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    // AWS over IPv6 (Nitro).
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Why an address may not be a webhook's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// This server's own listening address.
    ThisServer,
    /// Link-local or a known metadata service.
    Metadata,
    /// Unspecified, multicast, broadcast, reserved.
    NotUnicast,
    /// Loopback, private, shared (CGNAT) and other non-global ranges: allowed only by the operator.
    Private,
}

impl Forbidden {
    pub fn describe(self) -> &'static str {
        match self {
            Self::ThisServer => "is this server itself",
            Self::Metadata => "is a link-local or cloud metadata address",
            Self::NotUnicast => "is not a unicast address",
            Self::Private => {
                "is a loopback or private address (the server allows those only with \
                 --webhook-allow-private-targets)"
            }
        }
    }
}

/// The rules, as the operator set them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Allow loopback and private addresses (a receiver on the same host or network).
    pub allow_private: bool,
    /// This server's listening addresses (gRPC, metrics): never a target, whatever the flag.
    pub own_addresses: Vec<SocketAddr>,
}

impl TargetPolicy {
    /// Why `address` may not be a target, if it may not.
    pub fn judge(&self, address: SocketAddr) -> Option<Forbidden> {
        let ip = address.ip().to_canonical();
        if self.is_own(ip, address.port()) {
            return Some(Forbidden::ThisServer);
        }
        if METADATA_ADDRESSES.contains(&ip) {
            return Some(Forbidden::Metadata);
        }
        match ip {
            IpAddr::V4(v4) => judge_v4(v4),
            IpAddr::V6(v6) => judge_v6(v6),
        }
        .filter(|reason| !(self.allow_private && *reason == Forbidden::Private))
    }

    /// Whether `ip:port` reaches one of this server's own listeners: the same port on the
    /// address it listens on, or on any loopback address when it listens on loopback or on every
    /// address. (Its other addresses, behind a listener on every address, are private ones in
    /// most deployments, refused unless private targets are allowed.)
    fn is_own(&self, ip: IpAddr, port: u16) -> bool {
        self.own_addresses.iter().any(|own| {
            let own_ip = own.ip().to_canonical();
            own.port() == port
                && (own_ip == ip
                    || (ip.is_loopback() && (own_ip.is_loopback() || own_ip.is_unspecified())))
        })
    }

    /// Checks a webhook URL as a caller gave it: its form, and the address of its host (every
    /// address a name resolves to). Returns the URL in its normal form.
    pub async fn check_url(&self, text: &str) -> Result<Url> {
        let url = parse_url(text)?;
        let port = url.port_or_known_default().unwrap_or(0);
        match url.host() {
            Some(Host::Ipv4(ip)) => self.refuse(SocketAddr::new(ip.into(), port))?,
            Some(Host::Ipv6(ip)) => self.refuse(SocketAddr::new(ip.into(), port))?,
            // `localhost` and its subdomains are loopback whatever a resolver says (RFC 6761).
            Some(Host::Domain(name)) if is_localhost(name) => {
                self.refuse(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
                self.refuse(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port))?;
            }
            Some(Host::Domain(name)) => {
                let lookup = tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host((name.to_owned(), port)),
                )
                .await;
                let addresses: Vec<SocketAddr> = match lookup {
                    Ok(Ok(addresses)) => addresses.collect(),
                    _ => Vec::new(),
                };
                if addresses.is_empty() {
                    return Err(Error::invalid(
                        "url",
                        format!("the host {name} does not resolve"),
                    ));
                }
                for address in addresses {
                    self.refuse(address)?;
                }
            }
            None => return Err(Error::invalid("url", "must name a host")),
        }
        Ok(url)
    }

    /// Checks the address of a URL whose host is an IP address, before a delivery (the HTTP
    /// client resolves no name for it, so the resolver's guard does not see it).
    pub fn check_literal(&self, url: &Url) -> std::result::Result<(), Forbidden> {
        let port = url.port_or_known_default().unwrap_or(0);
        let ip: IpAddr = match url.host() {
            Some(Host::Ipv4(ip)) => ip.into(),
            Some(Host::Ipv6(ip)) => ip.into(),
            _ => return Ok(()),
        };
        self.judge(SocketAddr::new(ip, port)).map_or(Ok(()), Err)
    }

    fn refuse(&self, address: SocketAddr) -> Result<()> {
        match self.judge(address) {
            None => Ok(()),
            Some(reason) => Err(Error::WebhookTargetForbidden(format!(
                "the webhook's target {} {}",
                address.ip().to_canonical(),
                reason.describe()
            ))),
        }
    }
}

/// The URL's form: absolute http or https, a host, no credentials (they would be stored and
/// shown), no fragment, at most `MAX_URL_LEN` characters.
pub fn parse_url(text: &str) -> Result<Url> {
    if text.is_empty() {
        return Err(Error::invalid("url", "is required"));
    }
    if text.len() > MAX_URL_LEN {
        return Err(Error::invalid(
            "url",
            format!("must be at most {MAX_URL_LEN} characters"),
        ));
    }
    let url = Url::parse(text)
        .map_err(|error| Error::invalid("url", format!("is not a valid URL: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::invalid("url", "must be an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::invalid(
            "url",
            "must not carry a user name or password: authenticate the request by its signature",
        ));
    }
    if url.fragment().is_some() {
        return Err(Error::invalid("url", "must not have a fragment"));
    }
    if url.host().is_none() {
        return Err(Error::invalid("url", "must name a host"));
    }
    Ok(url)
}

fn is_localhost(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

fn judge_v4(ip: Ipv4Addr) -> Option<Forbidden> {
    let [a, b, c, _] = ip.octets();
    if ip.is_link_local() {
        return Some(Forbidden::Metadata);
    }
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || a == 0 || a >= 240 {
        return Some(Forbidden::NotUnicast);
    }
    let special = ip.is_loopback()
        || ip.is_private()
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments, 192.0.0.0/24.
        || (a == 192 && b == 0 && c == 0)
        // Documentation and benchmarking ranges.
        || (a == 192 && b == 0 && c == 2)
        || (a == 198 && (18..20).contains(&b))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113);
    special.then_some(Forbidden::Private)
}

fn judge_v6(ip: Ipv6Addr) -> Option<Forbidden> {
    let first = ip.segments()[0];
    // fe80::/10, link-local.
    if first & 0xffc0 == 0xfe80 {
        return Some(Forbidden::Metadata);
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return Some(Forbidden::NotUnicast);
    }
    if ip.is_loopback() {
        return Some(Forbidden::Private);
    }
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96) addresses carry an IPv4
    // address that a gateway may reach: judge that.
    let embedded = ip.to_ipv4().filter(|_| ip.segments()[..6] == [0; 6]);
    let nat64 = (ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
        let [.., hi, lo] = ip.segments();
        Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
    });
    if let Some(v4) = embedded.or(nat64) {
        return judge_v4(v4).or(Some(Forbidden::Private));
    }
    // fc00::/7, unique local.
    let special = first & 0xfe00 == 0xfc00
        // fec0::/10, site-local (deprecated).
        || first & 0xffc0 == 0xfec0
        // 2001:db8::/32, documentation.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // 2001::/23, IETF protocol assignments (Teredo and others).
        || (first == 0x2001 && ip.segments()[1] < 0x0200)
        // 2002::/16, 6to4: carries an IPv4 address.
        || first == 0x2002
        // 100::/64, discard-only.
        || (first == 0x0100 && ip.segments()[1..4] == [0, 0, 0]);
    special.then_some(Forbidden::Private)
}

/// The HTTP client's name resolver for deliveries: the system's resolver, with every address
/// the policy forbids dropped. A name left with no address fails to connect with the reason.
pub struct GuardedResolver {
    pub policy: Arc<TargetPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            if is_localhost(&host) && !policy.allow_private {
                return Err(forbidden_error(Forbidden::Private));
            }
            // The port is the connector's to set; 0 here.
            let resolved = tokio::net::lookup_host((host, 0)).await?;
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .filter(|address| match policy.judge_ip(address.ip()) {
                    None => true,
                    Some(reason) => {
                        refused = Some(reason);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(reason)) => Err(forbidden_error(reason)),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

impl TargetPolicy {
    /// `judge` without a port: the resolver does not know it. Refuses every one of this
    /// server's own addresses (any port), which errs on the safe side.
    fn judge_ip(&self, ip: IpAddr) -> Option<Forbidden> {
        let ip = ip.to_canonical();
        let own = self
            .own_addresses
            .iter()
            .any(|own| own.ip().to_canonical() == ip && !ip.is_loopback());
        if own {
            return Some(Forbidden::ThisServer);
        }
        self.judge(SocketAddr::new(ip, 0))
    }
}

/// The error a refused resolution ends in; the delivery records its text.
#[derive(Debug, thiserror::Error)]
#[error("target forbidden: the address {}", .0.describe())]
pub struct ForbiddenTarget(pub Forbidden);

fn forbidden_error(reason: Forbidden) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(ForbiddenTarget(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> TargetPolicy {
        TargetPolicy {
            allow_private: false,
            own_addresses: vec!["127.0.0.1:50051".parse().unwrap()],
        }
    }

    fn lenient() -> TargetPolicy {
        TargetPolicy {
            allow_private: true,
            ..strict()
        }
    }

    fn judge(policy: &TargetPolicy, address: &str) -> Option<Forbidden> {
        policy.judge(address.parse().unwrap())
    }

    #[test]
    fn metadata_link_local_and_non_unicast_are_refused_even_when_private_is_allowed() {
        for policy in [strict(), lenient()] {
            for address in [
                "169.254.169.254:80",
                "169.254.0.1:443",
                "[fe80::1]:80",
                "[fd00:ec2::254]:80",
                "100.100.100.200:80",
                "192.0.0.192:80",
                "[::ffff:169.254.169.254]:80",
            ] {
                assert_eq!(
                    judge(&policy, address),
                    Some(Forbidden::Metadata),
                    "{address}"
                );
            }
            for address in [
                "0.0.0.0:80",
                "[::]:80",
                "255.255.255.255:80",
                "224.0.0.1:80",
                "[ff02::1]:80",
                "240.0.0.1:80",
                "0.1.2.3:80",
            ] {
                assert_eq!(
                    judge(&policy, address),
                    Some(Forbidden::NotUnicast),
                    "{address}"
                );
            }
        }
    }

    #[test]
    fn this_server_is_refused_on_any_local_address_even_when_private_is_allowed() {
        for policy in [strict(), lenient()] {
            for address in ["127.0.0.1:50051", "127.0.0.2:50051", "[::1]:50051"] {
                assert_eq!(
                    judge(&policy, address),
                    Some(Forbidden::ThisServer),
                    "{address}"
                );
            }
        }
        let all_interfaces = TargetPolicy {
            allow_private: true,
            own_addresses: vec!["0.0.0.0:9000".parse().unwrap()],
        };
        assert_eq!(
            judge(&all_interfaces, "127.0.0.1:9000"),
            Some(Forbidden::ThisServer)
        );
        assert_eq!(judge(&all_interfaces, "127.0.0.1:9001"), None);
        // Another port on loopback is another program.
        assert_eq!(judge(&lenient(), "127.0.0.1:8080"), None);
    }

    #[test]
    fn private_addresses_need_the_operators_flag() {
        for address in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "10.0.0.1:80",
            "172.16.5.4:80",
            "192.168.1.1:80",
            "100.64.0.1:80",
            "[fc00::1]:80",
            "[fd12:3456::1]:80",
            "[::127.0.0.1]:80",
            "[64:ff9b::a00:1]:80",
            "[2002:a00:1::]:80",
        ] {
            assert_eq!(
                judge(&strict(), address),
                Some(Forbidden::Private),
                "{address}"
            );
            assert_eq!(judge(&lenient(), address), None, "{address}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for address in ["8.8.8.8:443", "93.184.216.34:80", "[2606:4700::1111]:443"] {
            assert_eq!(judge(&strict(), address), None, "{address}");
        }
    }

    #[test]
    fn a_urls_form_is_checked() {
        for bad in [
            "",
            "ftp://example.com/",
            "example.com/hook",
            "http://user:pw@example.com/",
            "http://user@example.com/",
            "https://example.com/#frag",
            "file:///etc/passwd",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(parse_url(&long).is_err());
        assert!(parse_url("https://example.com/hooks?x=1").is_ok());
    }

    #[tokio::test]
    async fn urls_naming_forbidden_hosts_are_refused() {
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:8080/",
            "http://[::1]:8080/",
            "http://[::ffff:7f00:1]:8080/",
            "http://localhost:8080/",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://0x7f.1/",
            "http://2130706433/",
            "http://10.0.0.1/",
        ] {
            let error = strict().check_url(url).await.expect_err(url);
            assert!(
                matches!(error, Error::WebhookTargetForbidden(_)),
                "{url}: {error:?}"
            );
        }
        let error = lenient()
            .check_url("http://localhost:50051/")
            .await
            .expect_err("this server");
        assert!(matches!(error, Error::WebhookTargetForbidden(_)));
        lenient()
            .check_url("http://127.0.0.1:8080/hook")
            .await
            .expect("a local receiver, allowed");
    }
}
