//! The egress policy. Refusals of non-loopback ranges are checked on the policy itself, so no
//! test can send a packet anywhere but loopback even if the code under test is wrong.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use midcall::exec::{Budget, Status};
use midcall::transport::{is_blocked, parse_ip_literal, EgressPolicy};
use midcall::{Call, Runtime};

use crate::support::servers::{Reply, TestServer};
use crate::support::{call_info, load_toml, AGENT};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn every_blocked_range_is_refused_by_the_policy() {
    let strict = EgressPolicy::new();
    for a in [
        "127.0.0.1",
        "127.255.255.254",
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.0.1",
        "100.64.0.1",
        "100.127.255.255",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.255",
        "255.255.255.255",
        "240.0.0.1",
        "198.18.0.1",
        "192.0.0.1",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fec0::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:192.168.0.1",
        "::127.0.0.1",
        "::10.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::1",
        "2002:7f00:1::1",
        "2002:c0a8:101::1",
    ] {
        assert!(is_blocked(ip(a)), "{a} must be blocked");
        let e = strict.check_ip(ip(a)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("destination {} is not allowed by the egress policy", ip(a))
        );
    }
    for a in [
        "8.8.8.8",
        "1.1.1.1",
        "100.128.0.1",
        "172.32.0.1",
        "2606:4700::1111",
        "64:ff9b::808:808",
        "::ffff:8.8.8.8",
    ] {
        assert!(!is_blocked(ip(a)), "{a} is public");
        assert!(strict.check_ip(ip(a)).is_ok());
    }
}

#[test]
fn allow_networks_exempt_only_what_they_cover() {
    let p = EgressPolicy::new().allow_network("10.1.0.0/16".parse().unwrap());
    assert!(p.check_ip(ip("10.1.2.3")).is_ok());
    assert!(p.check_ip(ip("10.2.0.1")).is_err());
    assert!(p.check_ip(ip("127.0.0.1")).is_err());
}

#[test]
fn http_is_refused_unless_allowed() {
    assert!(EgressPolicy::new().check_scheme(false).is_err());
    assert!(EgressPolicy::new().check_scheme(true).is_ok());
    assert!(EgressPolicy::new()
        .allow_http(true)
        .check_scheme(false)
        .is_ok());
}

#[test]
fn ip_literals_in_every_notation_are_recognised() {
    for (host, want) in [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("10.0.0.1.", "10.0.0.1"),
        ("[::1]", "::1"),
        ("[::ffff:7f00:1]", "::ffff:127.0.0.1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
    ] {
        let got = parse_ip_literal(host).unwrap_or_else(|| panic!("{host} is an IP literal"));
        assert_eq!(got, ip(want), "{host}");
        assert!(is_blocked(got), "{host}");
    }
    // "0x" reads as 0.0.0.0, as glibc's inet_aton reads it: treated as an address, and blocked.
    assert_eq!(parse_ip_literal("0x"), Some(ip("0.0.0.0")));
    for host in [
        "crm.example.com",
        "256.0.0.1",
        "1.2.3.4.5",
        "08.0.0.1",
        "localhost",
    ] {
        assert_eq!(parse_ip_literal(host), None, "{host}");
    }
}

fn strict_runtime() -> Runtime {
    Runtime::builder()
        .egress(EgressPolicy::new().allow_http(true))
        .build()
        .unwrap()
}

async fn attempt(rt: &Runtime, url: &str) -> midcall::Outcome {
    let text = format!("{AGENT}[[actions]]\nname = \"a\"\ndescription = \"d\"\nurl = \"{url}\"\non_failure = {{ say = \"no\" }}\n");
    let set = load_toml(&text).unwrap();
    let mut c = Call::new(call_info());
    rt.execute(
        set.action("a").unwrap(),
        &mut c,
        json!({}),
        &Budget::new(Duration::from_secs(5)),
    )
    .await
}

#[tokio::test]
async fn loopback_is_refused_end_to_end_in_every_spelling() {
    // A real server on loopback: a refusal must mean it saw no connection.
    let server = TestServer::http(|_, _| Reply::ok(json!({}))).await;
    let port = server.addr.port();
    let rt = strict_runtime();
    for host in [
        "127.0.0.1",
        "localhost",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::1]",
    ] {
        let out = attempt(&rt, &format!("http://{host}:{port}/x")).await;
        assert_eq!(out.status, Status::Rejected, "{host}: {:?}", out.error);
        let e = out.error.unwrap();
        assert!(e.is_egress(), "{host}: {e:?}");
        assert!(
            e.to_string()
                .contains("is not allowed by the egress policy"),
            "{host}: {e}"
        );
        assert_eq!(out.attempts, 0, "{host}");
        assert_eq!(out.say.as_deref(), Some("no"));
    }
    assert_eq!(
        server.accepted(),
        0,
        "no refused destination was ever connected to"
    );
    assert_eq!(rt.connections_opened(), 0);
}

#[tokio::test]
async fn plain_http_is_refused_by_default() {
    let server = TestServer::http(|_, _| Reply::ok(json!({}))).await;
    let rt = Runtime::builder()
        .egress(EgressPolicy::new().allow_network("127.0.0.0/8".parse().unwrap()))
        .build()
        .unwrap();
    let out = attempt(&rt, &format!("{}/x", server.origin())).await;
    assert_eq!(out.status, Status::Rejected);
    assert!(out
        .error
        .unwrap()
        .to_string()
        .contains("plain http:// is not allowed"));
    assert_eq!(server.accepted(), 0);
}

/// A resolver that answers every name with one address: a host that looked public at load
/// time resolving to a private address when the request is made.
struct FixedResolver(IpAddr);

impl midcall::transport::Resolve for FixedResolver {
    fn resolve(
        &self,
        _host: &str,
        port: u16,
    ) -> midcall::transport::BoxFuture<std::io::Result<Vec<std::net::SocketAddr>>> {
        let addr = std::net::SocketAddr::new(self.0, port);
        Box::pin(async move { Ok(vec![addr]) })
    }
}

#[tokio::test]
async fn a_public_name_resolving_to_a_private_address_is_refused_when_connecting() {
    let server = TestServer::http(|_, _| Reply::ok(json!({}))).await;
    let rt = Runtime::builder()
        .egress(EgressPolicy::new().allow_http(true))
        .resolver(Arc::new(FixedResolver(ip("127.0.0.1"))))
        .build()
        .unwrap();
    let out = attempt(
        &rt,
        &format!("http://crm.example.com:{}/x", server.addr.port()),
    )
    .await;
    assert_eq!(out.status, Status::Rejected);
    assert_eq!(
        out.error.unwrap().to_string(),
        "action \"a\": destination 127.0.0.1 is not allowed by the egress policy"
    );
    assert_eq!(server.accepted(), 0);
}
