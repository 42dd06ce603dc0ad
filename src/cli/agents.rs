//! Agent files given on the command line: files and directories of them, loaded together, and
//! loaded again on a reload keeping the last good version of a file that now has errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use midcall::config::Agents;
use midcall::ActionSet;

/// What the command line named, and the agent files that are there now.
#[derive(Debug, Clone)]
pub(crate) struct Files {
    given: Vec<String>,
    /// A directory is among them, or several paths: the agents are served as many.
    pub(crate) many: bool,
    pub(crate) paths: Vec<PathBuf>,
}

fn is_agent_file(p: &Path) -> bool {
    p.is_file()
        && matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("toml" | "json")
        )
}

fn list(given: &[String]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for g in given {
        let p = Path::new(g);
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{g}: {e}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_agent_file(p))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(format!(
                    "{g}: no agent files (*.toml, *.json) in this directory"
                ));
            }
            out.extend(found);
        } else if p.exists() {
            out.push(p.to_path_buf());
        } else {
            return Err(format!("{g}: no such file or directory"));
        }
    }
    Ok(out)
}

/// The agent files `given` names (a directory: every `*.toml` and `*.json` in it, sorted).
pub(crate) fn expand(given: &[String]) -> Result<Files, String> {
    let many = given.len() > 1 || given.iter().any(|g| Path::new(g).is_dir());
    Ok(Files {
        given: given.to_vec(),
        many,
        paths: list(given)?,
    })
}

/// The same paths, listed again for a reload: files added to a directory are in, files gone
/// (or a directory emptied) are out, and what is gone is said (their agents are no longer
/// served).
pub(crate) fn expand_again(f: &Files) -> (Files, Vec<String>) {
    let mut paths = Vec::new();
    let mut gone = Vec::new();
    for g in &f.given {
        match list(std::slice::from_ref(g)) {
            Ok(p) => paths.extend(p),
            Err(e) => gone.push(e),
        }
    }
    (
        Files {
            given: f.given.clone(),
            many: f.many,
            paths,
        },
        gone,
    )
}

type Stamp = Option<(SystemTime, u64)>;

fn stamp(p: &Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[derive(Clone)]
struct Entry {
    stamp: Stamp,
    /// The version in service: the file's, or the last good one when it has errors now.
    set: Option<Arc<ActionSet>>,
}

/// The loaded agent files.
#[derive(Clone)]
pub(crate) struct Loaded {
    many: bool,
    entries: BTreeMap<PathBuf, Entry>,
}

impl Loaded {
    /// Loads `files`. With `previous` (a reload), a file that fails keeps its previous
    /// version. Returns every file's problems (file:line:column: ...).
    pub(crate) fn load(files: &Files, previous: Option<&Loaded>) -> (Loaded, Vec<String>) {
        let mut entries = BTreeMap::new();
        let mut problems = Vec::new();
        for p in &files.paths {
            let st = stamp(p);
            let before = previous.and_then(|l| l.entries.get(p));
            match ActionSet::load(p) {
                Ok(set) => {
                    entries.insert(
                        p.clone(),
                        Entry {
                            stamp: st,
                            set: Some(Arc::new(set)),
                        },
                    );
                }
                Err(e) => {
                    problems.push(e.to_string());
                    entries.insert(
                        p.clone(),
                        Entry {
                            stamp: st,
                            set: before.and_then(|b| b.set.clone()),
                        },
                    );
                }
            }
        }
        (
            Loaded {
                many: files.many,
                entries,
            },
            problems,
        )
    }

    /// The agents to serve: every file's version in service.
    pub(crate) fn agents(&self) -> Result<Agents, String> {
        let sets: Vec<Arc<ActionSet>> = self
            .entries
            .values()
            .filter_map(|e| e.set.clone())
            .collect();
        if sets.is_empty() {
            return Err("no agent file loaded".into());
        }
        if self.many {
            Ok(Agents::many(sets)?)
        } else {
            Ok(Agents::one(sets[0].clone()))
        }
    }

    /// Whether the files listed or their contents changed since they were loaded.
    pub(crate) fn changed(&self, files: &Files) -> bool {
        files.paths.len() != self.entries.len()
            || files
                .paths
                .iter()
                .any(|p| self.entries.get(p).is_none_or(|e| e.stamp != stamp(p)))
    }

    /// After a refused reload: remembers the files as seen (so the same refusal is not
    /// logged again every check) while keeping the versions in service.
    pub(crate) fn remember(&mut self, seen: &Loaded) {
        let mut entries = BTreeMap::new();
        for (p, e) in &seen.entries {
            entries.insert(
                p.clone(),
                Entry {
                    stamp: e.stamp,
                    set: self.entries.get(p).and_then(|old| old.set.clone()),
                },
            );
        }
        self.entries = entries;
    }
}
