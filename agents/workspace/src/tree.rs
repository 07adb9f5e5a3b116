//! The workspace's tree metadata that plain objects can't carry: symlinks (their target text),
//! directories (so empty ones come back) and permission bits. It travels as one small sidecar
//! object per workspace prefix, `<prefix>/.berth/tree.json`, written conditionally like any other
//! object; the workspace-relative path `.berth` is reserved for it.
//!
//! A sidecar rather than object attributes: `file://` (LocalFileSystem) refuses attributes, S3
//! caps user metadata at 2 KiB per object, symlinks and empty directories have no object to hang
//! attributes on, and one object lets a single conditional write cover a whole tree change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The reserved top-level name; locally it is refused, in the store it holds the sidecar.
pub const RESERVED_NAME: &str = ".berth";
/// The sidecar's path relative to the workspace prefix.
pub const SIDECAR_PATH: &str = ".berth/tree.json";
/// The sidecar format this build writes and reads.
pub const TREE_VERSION: u32 = 1;
/// Files without an entry in `modes` have these permission bits.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Permission bits kept: read, write and execute for user, group and other (never setuid,
/// setgid or sticky, which a workspace user must not be able to plant on the host).
pub const MODE_MASK: u32 = 0o777;

/// Permission bits, written as octal text (`"755"`) so the sidecar reads like `ls -l`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mode(pub u32);

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:o}", self.0 & MODE_MASK))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Mode, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bits = u32::from_str_radix(&text, 8).map_err(|_| serde::de::Error::custom(format!("mode {text:?} is not octal")))?;
        if bits > MODE_MASK {
            return Err(serde::de::Error::custom(format!("mode {text:?} has bits beyond 777")));
        }
        Ok(Mode(bits))
    }
}

/// What the sidecar records. Paths are workspace-relative, `/`-separated, checked like keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// Symlink path -> target text, verbatim (never resolved, may be absolute or point outside).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<String, String>,
    /// Every directory -> its permission bits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub directories: BTreeMap<String, Mode>,
    /// Files whose permission bits are not 644 -> their bits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub modes: BTreeMap<String, Mode>,
}

/// The sidecar object as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    version: u32,
    #[serde(flatten)]
    tree: Tree,
}

impl Tree {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.directories.is_empty() && self.modes.is_empty()
    }

    /// The permission bits of a file.
    pub fn file_mode(&self, path: &str) -> u32 {
        self.modes.get(path).map_or(DEFAULT_FILE_MODE, |mode| mode.0)
    }

    /// The sidecar object's bytes; an error instead of an empty sidecar, which would read as a
    /// corrupt tree.
    pub fn to_sidecar_bytes(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec_pretty(&Sidecar { version: TREE_VERSION, tree: self.clone() })
            .map_err(|error| format!("{SIDECAR_PATH}: {error}"))
    }

    pub fn from_sidecar_bytes(bytes: &[u8]) -> Result<Tree, String> {
        let sidecar: Sidecar = serde_json::from_slice(bytes).map_err(|error| format!("{SIDECAR_PATH}: {error}"))?;
        if sidecar.version != TREE_VERSION {
            return Err(format!("{SIDECAR_PATH}: version {} is not the {TREE_VERSION} this build reads", sidecar.version));
        }
        for path in sidecar.tree.links.keys().chain(sidecar.tree.directories.keys()).chain(sidecar.tree.modes.keys()) {
            crate::keys::WorkspacePath::parse(path).map_err(|reason| format!("{SIDECAR_PATH}: {reason}"))?;
            if is_reserved(path) {
                return Err(format!("{SIDECAR_PATH}: {path:?} is under the reserved {RESERVED_NAME}"));
            }
        }
        Ok(sidecar.tree)
    }

    /// Three-way merge: `remote` with every change `local` made relative to `base` applied on top.
    /// Used when another writer replaced the sidecar since this session read it.
    pub fn merged(base: &Tree, local: &Tree, remote: &Tree) -> Tree {
        Tree {
            links: merge_map(&base.links, &local.links, &remote.links),
            directories: merge_map(&base.directories, &local.directories, &remote.directories),
            modes: merge_map(&base.modes, &local.modes, &remote.modes),
        }
    }
}

fn merge_map<V: Clone + PartialEq>(
    base: &BTreeMap<String, V>,
    local: &BTreeMap<String, V>,
    remote: &BTreeMap<String, V>,
) -> BTreeMap<String, V> {
    let mut merged = remote.clone();
    for key in base.keys().chain(local.keys()) {
        let (before, now) = (base.get(key), local.get(key));
        if before == now {
            continue;
        }
        match now {
            Some(value) => merged.insert(key.clone(), value.clone()),
            None => merged.remove(key),
        };
    }
    merged
}

/// Whether a workspace-relative path is the reserved `.berth` or below it.
pub fn is_reserved(path: &str) -> bool {
    path == RESERVED_NAME || path.starts_with(".berth/")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tree(links: &[(&str, &str)], directories: &[(&str, u32)]) -> Tree {
        Tree {
            links: links.iter().map(|(path, target)| ((*path).to_owned(), (*target).to_owned())).collect(),
            directories: directories.iter().map(|(path, mode)| ((*path).to_owned(), Mode(*mode))).collect(),
            modes: BTreeMap::new(),
        }
    }

    #[test]
    fn sidecar_round_trips_with_octal_modes() {
        let mut original = tree(&[("latest", "reports/2026"), ("abs", "/etc/passwd")], &[("empty", 0o755), ("private", 0o700)]);
        original.modes.insert("run.sh".into(), Mode(0o755));
        let bytes = original.to_sidecar_bytes().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"run.sh\": \"755\"") && text.contains("\"version\": 1"), "{text}");
        assert_eq!(Tree::from_sidecar_bytes(&bytes).unwrap(), original);
        assert!(Tree::from_sidecar_bytes(br#"{"version":1,"links":{"../x":"y"}}"#).is_err());
        assert!(Tree::from_sidecar_bytes(br#"{"version":1,"modes":{"a":"4755"}}"#).is_err());
        assert!(Tree::from_sidecar_bytes(br#"{"version":1,"links":{".berth/x":"y"}}"#).is_err());
        assert!(Tree::from_sidecar_bytes(br#"{"version":2}"#).is_err());
        assert!(Tree::from_sidecar_bytes(br#"{"version":1,"extra":{}}"#).is_err());
    }

    #[test]
    fn merge_applies_local_changes_on_top_of_remote() {
        let base = tree(&[("a", "1"), ("b", "1")], &[("d", 0o755)]);
        let local = tree(&[("a", "2"), ("c", "1")], &[("d", 0o755)]);
        let remote = tree(&[("a", "1"), ("b", "1"), ("r", "remote")], &[("d", 0o700), ("e", 0o755)]);
        let merged = Tree::merged(&base, &local, &remote);
        assert_eq!(merged, tree(&[("a", "2"), ("c", "1"), ("r", "remote")], &[("d", 0o700), ("e", 0o755)]));
    }
}
