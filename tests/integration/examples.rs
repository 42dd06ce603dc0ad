//! Every agent in examples/ loads and compiles.

#[test]
fn every_example_agent_passes_check() {
    let dir = crate::support::root().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path().join("agent.toml");
        if path.exists() {
            if let Err(e) = midcall::ActionSet::load(&path) {
                panic!("{}:\n{e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 2, "at least two example agents, found {n}");
}
