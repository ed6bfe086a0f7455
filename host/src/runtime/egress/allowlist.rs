//! Which URLs a plugin may call, and which addresses may be reached at all.
//!
//! Pure: parsing a manifest's `allowed_hosts` (Spin's `scheme://host[:port]`
//! format, deny by default) and matching a request's scheme, host and port
//! against it; and the address table that keeps plugins off loopback,
//! private, link-local (cloud metadata), unique-local, multicast and reserved
//! networks. It does no I/O; `mod.rs` resolves names and connects.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One `allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    scheme: Scheme,
    host: HostPattern,
    /// `None` is any port (`:*`).
    port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "http" => Some(Self::Http),
            "https" => Some(Self::Https),
            _ => None,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// A name, lower-case, or an IP address as written.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (not the bare name).
    Subdomains(String),
}

impl AllowedHost {
    /// Parse an entry, refusing anything that is not `scheme://host[:port]`
    /// with `http` or `https`, a host that is a name, an IP address or
    /// `*.` plus a name, and a port that is a number or `*`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let refuse = |why: &str| Err(format!("allowed_hosts entry {entry:?}: {why}"));
        if entry == "*" || entry.contains("://*:") || entry.ends_with("://*") {
            return refuse("every host is not allowed: list the hosts the plugin calls");
        }
        let Some((scheme, rest)) = entry.split_once("://") else {
            return refuse("expected scheme://host[:port], e.g. https://api.example.com");
        };
        let Some(scheme) = Scheme::parse(scheme) else {
            return refuse("the scheme must be http or https");
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return refuse("a host, not a URL: no path, query or user");
        }
        let Some((host, port)) = split_port(rest) else {
            return refuse("an IPv6 address is written in brackets, e.g. http://[::1]:8080");
        };
        let port = match port {
            None => Some(scheme.default_port()),
            Some("*") => None,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => return refuse("the port must be a number or *"),
            },
        };
        let host = host.to_ascii_lowercase();
        let pattern = match host.strip_prefix("*.") {
            Some(suffix) if valid_name(suffix) => HostPattern::Subdomains(suffix.to_owned()),
            Some(_) => return refuse("a wildcard is `*.` followed by a name"),
            None if host.contains('*') => {
                return refuse("a wildcard may only be a leading `*.`");
            }
            None if parse_ip(&host).is_some() || valid_name(&host) => HostPattern::Exact(host),
            None => return refuse("not a host name or IP address"),
        };
        Ok(Self {
            scheme,
            host: pattern,
            port,
        })
    }

    /// Whether a request to `scheme://host:port` is allowed by this entry.
    pub fn matches(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let host_matches = match &self.host {
            HostPattern::Exact(name) => *name == host,
            HostPattern::Subdomains(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        };
        self.scheme == scheme && host_matches && self.port.is_none_or(|p| p == port)
    }

    /// Whether this entry names `host` itself, not through a wildcard: only
    /// such a host may reach a private address, and only if the operator
    /// allows private networks.
    pub fn names(&self, host: &str) -> bool {
        matches!(&self.host, HostPattern::Exact(name) if name.eq_ignore_ascii_case(host))
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let host = match &self.host {
            HostPattern::Exact(name) => name.clone(),
            HostPattern::Subdomains(suffix) => format!("*.{suffix}"),
        };
        match self.port {
            Some(port) => write!(f, "{scheme}://{host}:{port}"),
            None => write!(f, "{scheme}://{host}:*"),
        }
    }
}

/// `host[:port]`, with `[v6]` brackets removed.
fn split_port(text: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return Some((host, after.strip_prefix(':')));
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((text, None)),
    }
}

/// An IP address as a URL's host writes it (`[::1]` without brackets too).
pub fn parse_ip(host: &str) -> Option<IpAddr> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Whether `ip` is an address plugins may not reach unless the operator
/// allows private networks: anything but a public unicast address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16: cloud metadata
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // 0/8
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24, special purpose
        || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18/15
        || a >= 240 // reserved 240/4
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded_v4 = |ip: Ipv6Addr| {
        let o = ip.octets();
        Ipv4Addr::new(o[12], o[13], o[14], o[15])
    };
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (segments[0] & 0xffc0) == 0xfe80 // link local fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site local fec0::/10
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address.
        || (segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_private_v4(embedded_v4(ip)))
        || (segments[0] == 0x2002
            && is_private_v4(Ipv4Addr::new(
                (segments[1] >> 8) as u8,
                segments[1] as u8,
                (segments[2] >> 8) as u8,
                segments[2] as u8,
            )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_in_spins_format_and_nothing_else() {
        for ok in [
            "https://api.example.com",
            "https://*.myshop.example:8443",
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "https://api.example.com:*",
            "https://api.example.com/",
        ] {
            assert!(AllowedHost::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "*",
            "https://*",
            "https://*:443",
            "https://api.example.com/v1",
            "https://api.*.example.com",
            "https://*example.com",
            "ftp://example.com",
            "example.com",
            "https://user@example.com",
            "https://example.com:0",
        ] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_by_scheme_host_and_port() {
        let api = AllowedHost::parse("https://API.example.com").unwrap();
        assert!(api.matches(Scheme::Https, "api.example.com", 443));
        assert!(!api.matches(Scheme::Http, "api.example.com", 443));
        assert!(!api.matches(Scheme::Https, "api.example.com", 8443));
        assert!(!api.matches(Scheme::Https, "evil.api.example.com", 443));
        let shop = AllowedHost::parse("https://*.myshop.example:8443").unwrap();
        assert!(shop.matches(Scheme::Https, "eu.myshop.example", 8443));
        assert!(!shop.matches(Scheme::Https, "myshop.example", 8443));
        assert!(!shop.matches(Scheme::Https, "evilmyshop.example", 8443));
        assert!(!shop.names("myshop.example"));
        assert!(api.names("api.example.com"));
    }

    #[test]
    fn the_address_table() {
        for private in [
            "0.0.0.0",
            "10.10.10.10",
            "100.64.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "192.0.0.1",
            "192.168.1.1",
            "198.18.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:10.10.10.10",
            "::ffff:127.0.0.1",
            "fc00::f00d",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(is_private(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::101:101",
        ] {
            assert!(!is_private(public.parse().unwrap()), "{public}");
        }
    }
}
