use super::*;

#[test]
fn plain_http_reaches_the_admin_surface_from_loopback_only() {
    let plain = Admin::new(Some(Secret::new("k".repeat(20))), None, false);
    assert!(plain
        .transport_refusal("127.0.0.1".parse().unwrap())
        .is_none());
    assert!(plain.transport_refusal("::1".parse().unwrap()).is_none());
    assert!(plain
        .transport_refusal("10.0.0.7".parse().unwrap())
        .is_some());
    let proxied = Admin::new(Some(Secret::new("k".repeat(20))), None, true);
    assert!(proxied
        .transport_refusal("10.0.0.7".parse().unwrap())
        .is_none());
}

#[test]
fn keys_and_tokens_compare_exactly() {
    let a = Admin::new(Some(Secret::new("the-admin-key-123456")), None, false);
    assert!(a.is_key("the-admin-key-123456"));
    assert!(!a.is_key("the-admin-key-12345"));
    assert!(!a.is_key(""));
    let t = a.sign("csrf:abc");
    assert!(a.verify("csrf:abc", &t));
    assert!(!a.verify("csrf:abd", &t));
    assert!(!a.verify("csrf:abc", &t[1..]));
    let off = Admin::new(None, None, false);
    assert!(!off.is_key("anything"));
}

#[test]
fn times_parse_as_rfc3339_or_milliseconds() {
    assert_eq!(parse_time("since", "1234").unwrap(), 1234);
    assert!(parse_time("since", "soon").unwrap_err().1.contains("since"));
}
