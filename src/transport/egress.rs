//! The egress policy (SSRF guard): which destinations actions and webhooks may reach. A value
//! the transport is given (`config` builds it from an agent's `[egress]`); imports no config.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Where requests may go. HTTPS only unless `allow_http`; every address a host resolves to is
/// checked when connecting, and loopback, private (RFC 1918), link-local (incl.
/// 169.254.169.254), CGNAT, unspecified, multicast, broadcast, IPv6 ULA and link-local, and the
/// IPv4-mapped, IPv4-compatible and NAT64 forms of all of these are refused unless inside
/// `allow_networks`.
///
/// The default refuses plain HTTP and every blocked range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EgressPolicy {
    allow_http: bool,
    allow_networks: Vec<IpNet>,
}

/// A destination the policy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressRefusal {
    /// `http://` without `allow_http`.
    PlainHttp,
    /// An address in a blocked range.
    Address(IpAddr),
}

impl fmt::Display for EgressRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressRefusal::PlainHttp => f.write_str(
                "plain http:// is not allowed by the egress policy (set [egress] allow_http = true)",
            ),
            EgressRefusal::Address(ip) => {
                write!(f, "destination {ip} is not allowed by the egress policy")
            }
        }
    }
}

impl EgressPolicy {
    /// The strict default: HTTPS only, no blocked range allowed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows plain `http://`.
    pub fn allow_http(mut self, yes: bool) -> Self {
        self.allow_http = yes;
        self
    }

    /// Exempts a network from the blocked ranges (local development, tests).
    pub fn allow_network(mut self, net: IpNet) -> Self {
        if !self.allow_networks.contains(&net) {
            self.allow_networks.push(net);
        }
        self
    }

    /// Whether `http://` is allowed.
    pub fn allows_http(&self) -> bool {
        self.allow_http
    }

    /// Checks a scheme.
    pub fn check_scheme(&self, https: bool) -> Result<(), EgressRefusal> {
        if https || self.allow_http {
            Ok(())
        } else {
            Err(EgressRefusal::PlainHttp)
        }
    }

    /// Checks one address.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), EgressRefusal> {
        if !is_blocked(ip) || self.allow_networks.iter().any(|n| n.contains(&ip)) {
            Ok(())
        } else {
            Err(EgressRefusal::Address(ip))
        }
    }
}

/// True for addresses no action may reach by default.
pub(crate) fn is_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn blocked_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_unspecified()          // 0.0.0.0
        || o[0] == 0             // 0.0.0.0/8 "this network"
        || ip.is_loopback()      // 127.0.0.0/8
        || ip.is_private()       // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local()    // 169.254/16, incl. cloud metadata
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || ip.is_multicast()     // 224/4
        || o[0] >= 240           // 240/4 reserved, incl. broadcast
        || ip.is_broadcast()
}

fn blocked_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4(v4); // ::ffff:a.b.c.d
    }
    if s[0..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        // ::a.b.c.d, IPv4-compatible (deprecated, still routed by some stacks)
        return blocked_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // 64:ff9b::/96 NAT64 well-known prefix
        return blocked_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return true; // 64:ff9b:1::/48 local-use NAT64
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 ULA
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        || (s[0] & 0xff00) == 0xff00 // ff00::/8 multicast
        || (s[0] == 0x2002 && blocked_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ))) // 2002::/16 6to4 wrapping a blocked address
        || s[0] == 0x100 && s[1..4] == [0, 0, 0] // 100::/64 discard
}

/// Parses a host the way C's `inet_aton` does, which is how many resolvers read it: decimal,
/// octal (`0177.0.0.1`) and hex (`0x7f.1`) parts, and the short forms `a`, `a.b`, `a.b.c`.
/// Also plain and bracketed IPv6. `None` for a host name.
pub(crate) fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    let h = host.strip_suffix('.').unwrap_or(host);
    if let Some(inner) = h.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(v6) = h.parse::<Ipv6Addr>() {
        return Some(IpAddr::V6(v6));
    }
    let parts: Vec<&str> = h.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        nums.push(parse_c_number(p)?);
    }
    let last = *nums.last()?;
    let head = &nums[..nums.len() - 1];
    if head.iter().any(|n| *n > 255) {
        return None;
    }
    let max_last: u64 = match nums.len() {
        1 => u32::MAX as u64,
        2 => 0x00ff_ffff,
        3 => 0xffff,
        _ => 0xff,
    };
    if last > max_last {
        return None;
    }
    let mut value: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        value |= n << (24 - 8 * i);
    }
    value |= last;
    Some(IpAddr::V4(Ipv4Addr::from(value as u32)))
}

fn parse_c_number(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() {
        return if radix == 16 { Some(0) } else { None };
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}
