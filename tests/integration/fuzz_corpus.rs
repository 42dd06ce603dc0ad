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
    replay("config_load", midcall::fuzzing::config_load);
}

#[test]
fn template_render_corpus() {
    replay("template_render", midcall::fuzzing::template_render);
}

#[test]
fn jsonpath_compile_corpus() {
    replay("jsonpath_compile", midcall::fuzzing::jsonpath_compile);
}
