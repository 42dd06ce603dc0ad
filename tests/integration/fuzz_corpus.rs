//! Replays every fuzz corpus file through the library's fuzz target bodies, on stable Rust, so
//! CI catches a regression the fuzzers once found.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = crate::support::root().join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("?")
            .to_string();
        let result = std::panic::catch_unwind(|| body(&data));
        assert!(result.is_ok(), "{target}: {name} panicked");
        n += 1;
    }
    assert!(
        n > 0,
        "{target}: empty corpus at {}",
        Path::new(&dir).display()
    );
}

#[test]
fn config_load_corpus() {
    replay("config_load", midcall::testing::config_load);
}

#[test]
fn template_render_corpus() {
    replay("template_render", midcall::testing::template_render);
}

#[test]
fn jsonpath_compile_corpus() {
    replay("jsonpath_compile", midcall::testing::jsonpath_compile);
}

/// Found by `jsonpath_compile`: serde_json_path panicked when a query ended inside a `\u`
/// escape. Now a compile error with a position.
#[test]
fn regression_truncated_unicode_escape_is_an_error_not_a_panic() {
    for q in [
        r#"$["\uD800\u"#,
        r#"$["\u"#,
        r#"$['\uD8"#,
        r#"$["\uD800\uDC"#,
    ] {
        let e = midcall::Query::compile(q).unwrap_err();
        assert!(e.position >= 1, "{q}: {e}");
    }
    // Escaped backslashes before a `u` and complete escapes still compile.
    assert!(midcall::Query::compile(r#"$['\\u']"#).is_ok());
    assert!(midcall::Query::compile(r#"$["\uD834\uDD1E"]"#).is_ok());
}

/// Found by `template_render`: a bracketed host that is not an IPv6 address was accepted and
/// could carry a NUL into the URL. Now refused at compile time.
#[test]
fn regression_bracketed_host_must_be_ipv6() {
    use midcall::template::{UrlTemplate, ACTION_ROOTS};
    let e = UrlTemplate::compile("https://[p::::::=\0:: h}]/x", ACTION_ROOTS).unwrap_err();
    assert!(
        e.message.contains("is not a valid IPv6 address"),
        "{}",
        e.message
    );
    let ok = UrlTemplate::compile("https://[::1]:8443/x", ACTION_ROOTS).unwrap();
    assert_eq!((ok.host(), ok.port()), ("[::1]", 8443));
}

/// Found by `jsonpath_compile` (a slow unit): nested filters made serde_json_path's parse time
/// grow about 2x per level. Nesting is now limited to 10, refused at once with a position.
#[test]
fn regression_deeply_nested_filters_are_refused_quickly() {
    let deep = format!("$[?{}@{}]", "$[?".repeat(20), "]".repeat(20));
    let e = midcall::Query::compile(&deep).unwrap_err();
    assert!(e.message.contains("nest more than 10 deep"), "{e}");
    assert_eq!(e.position, 32, "the 11th opening bracket");
    let ok = format!("$[?{}@{}]", "@[?".repeat(3), "]".repeat(3));
    assert!(
        midcall::Query::compile(&ok).is_ok(),
        "three levels still compile"
    );
    // Brackets inside string literals do not count.
    assert!(midcall::Query::compile("$['[[[[[[[[[[[[[[[[']").is_ok());
    assert!(midcall::Query::compile(&format!("$.a{}", "[0]".repeat(100))).is_ok());
    let long = format!("$.{}", "a".repeat(5000));
    assert!(midcall::Query::compile(&long)
        .unwrap_err()
        .message
        .contains("longer than 4096"));
}

#[test]
fn response_extract_corpus() {
    replay("response_extract", midcall::testing::response_extract);
}

#[test]
fn retry_after_corpus() {
    replay("retry_after", midcall::testing::retry_after);
}

#[test]
fn egress_host_corpus() {
    replay("egress_host", midcall::testing::egress_host);
}

#[test]
fn inbound_verify_corpus() {
    replay("inbound_verify", midcall::testing::inbound_verify);
}
