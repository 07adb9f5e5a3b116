//! The only door between object keys and local paths: a relative path inside the workspace maps to
//! exactly one key under the workspace prefix and back, and anything that could escape (`..`,
//! absolute paths, NUL and control characters, backslashes, percent-encoded dots or slashes) is refused.

use object_store::path::{Path as ObjectPath, PathPart};
use unicode_normalization::UnicodeNormalization;

/// Longest file name most Linux file systems accept, in bytes.
const MAX_SEGMENT_BYTES: usize = 255;
/// Longest relative path we accept, in bytes (Linux `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;

/// A relative path inside a workspace, `/`-separated, every segment checked by [`check_segment`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkspacePath(String);

impl WorkspacePath {
    /// Validates a `/`-separated relative path (from a local walk or from an object key).
    pub fn parse(relative: &str) -> Result<WorkspacePath, String> {
        if relative.is_empty() {
            return Err("empty path".to_owned());
        }
        if relative.len() > MAX_PATH_BYTES {
            return Err(format!("path longer than {MAX_PATH_BYTES} bytes"));
        }
        if relative.starts_with('/') {
            return Err(format!("{relative:?} is absolute"));
        }
        for segment in relative.split('/') {
            check_segment(segment).map_err(|reason| format!("{relative:?}: {reason}"))?;
        }
        Ok(WorkspacePath(relative.to_owned()))
    }

    /// The key of this file under `prefix`: segments are used verbatim (no re-encoding), so the
    /// key is exactly the local path and every tool sees the same name.
    pub fn to_key(&self, prefix: &ObjectPath) -> ObjectPath {
        let parts = self.0.split('/').map(|segment| PathPart::parse(segment).unwrap_or_else(|_| PathPart::from(segment)));
        prefix.parts().chain(parts).collect()
    }

    /// The relative path of an object listed under `prefix`, or why it is refused.
    pub fn from_key(key: &ObjectPath, prefix: &ObjectPath) -> Result<WorkspacePath, String> {
        let Some(parts) = key.prefix_match(prefix) else {
            // Quoted: a key comes from outside, and a bidi or zero-width mark printed raw garbles the line.
            return Err(format!("{:?} is not under {:?}", key.as_ref(), prefix.as_ref()));
        };
        let segments: Vec<String> = parts.map(|part| part.as_ref().to_owned()).collect();
        WorkspacePath::parse(&segments.join("/"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The folder holding this path; `None` at the top level.
    pub fn parent(&self) -> Option<WorkspacePath> {
        self.0.rsplit_once('/').map(|(parent, _)| WorkspacePath(parent.to_owned()))
    }

    /// The last segment.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// A sibling with another last segment, checked like any path.
    pub fn with_file_name(&self, name: &str) -> Result<WorkspacePath, String> {
        match self.0.rsplit_once('/') {
            Some((parent, _)) => WorkspacePath::parse(&format!("{parent}/{name}")),
            None => WorkspacePath::parse(name),
        }
    }

    /// The path below `root` on the local file system.
    pub fn under(&self, root: &std::path::Path) -> std::path::PathBuf {
        root.join(&self.0)
    }
}

impl std::fmt::Display for WorkspacePath {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// One file or folder name. Refuses what could escape the workspace or mean different things to
/// different tools: dot segments, separators, control characters, and percent-encodings of those
/// (a key such as `%2E%2E` is harmless to us but becomes `..` to any tool that decodes it).
fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("empty segment (`//` or a trailing `/`)".to_owned());
    }
    if segment == "." || segment == ".." {
        return Err(format!("dot segment {segment:?}"));
    }
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(format!("segment longer than {MAX_SEGMENT_BYTES} bytes"));
    }
    if let Some(bad) = segment.chars().find(|c| c.is_control() || *c == '\\' || *c == '\u{FEFF}') {
        return Err(format!("forbidden character {bad:?}"));
    }
    let decoded = percent_decode_lossy(segment);
    if decoded != segment && (is_hostile_form(&decoded) || is_escaped_again(&decoded)) {
        return Err(format!("percent-encoded separator, dot segment or control character in {segment:?}"));
    }
    // Tools that apply Unicode compatibility normalization (NFKC) read `．．` (fullwidth full
    // stops) or `‥` (two dot leader) as `..`, `／` as `/` and `％２Ｅ` as `%2E`: the name must stay
    // harmless normalized, decoded, or both, in either order.
    let compatible: String = segment.nfkc().collect();
    let compatible_decoded = percent_decode_lossy(&compatible);
    let decoded_compatible: String = decoded.nfkc().collect();
    let normalized_is_hostile = compatible != segment && is_hostile_form(&compatible)
        || compatible_decoded != compatible && (is_hostile_form(&compatible_decoded) || is_escaped_again(&compatible_decoded))
        || decoded_compatible != decoded && is_hostile_form(&decoded_compatible);
    if normalized_is_hostile {
        return Err(format!("{segment:?} reads as a dot segment, separator or control character once Unicode-normalized (NFKC)"));
    }
    Ok(())
}

/// A name as a tool downstream may read it: a dot segment, or holding a separator or a control.
fn is_hostile_form(form: &str) -> bool {
    form == "." || form == ".." || form.contains('/') || form.contains('\\') || form.chars().any(char::is_control)
}

/// Whether a decoded name still holds escapes: a double encoding, decoded again by some tool.
fn is_escaped_again(decoded: &str) -> bool {
    decoded.contains('%') && percent_decode_lossy(decoded) != decoded
}

/// Decodes `%XX` sequences; anything that is not a valid escape stays as it is.
fn percent_decode_lossy(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            let high = (bytes[index + 1] as char).to_digit(16);
            let low = (bytes[index + 2] as char).to_digit(16);
            if let (Some(high), Some(low)) = (high, low) {
                decoded.push((high * 16 + low) as u8);
                index += 3;
                continue;
            }
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(relative: &str, accepted: bool) {
        let outcome = WorkspacePath::parse(relative);
        assert_eq!(outcome.is_ok(), accepted, "{relative:?} -> {outcome:?}");
    }

    #[test]
    fn relative_path_table() {
        check("a.txt", true);
        check("src/main.rs", true);
        check("notes/100% done.md", true);
        check("pleadings/Ünïcode name (1).pdf", true);
        check(".hidden/file", true);
        check("..hidden", true);
        check("%41bc", true);
        check("", false);
        check("/etc/shadow", false);
        check("../etc/shadow", false);
        check("a/../../etc", false);
        check("a/./b", false);
        check("a//b", false);
        check("a/", false);
        check("a\0b", false);
        check("a\nb", false);
        check("a\\..\\b", false);
        check("%2E%2E/etc", false);
        check("a/%2e%2e", false);
        check("a%2Fb", false);
        check("a%5C..", false);
        check("%252E%252E", false);
        check("%00", false);
        check(&"x".repeat(256), false);
        // Found by tests/key_properties.rs: `..` and `/` as Unicode compatibility forms.
        check("\u{FF0E}", false);
        check("\u{FF0E}\u{FF0E}", false);
        check("a/\u{2025}/etc", false);
        check("\u{FE52}\u{FE52}", false);
        check("a\u{FF0F}b", false);
        check("\u{FF05}\u{FF12}\u{FF25}\u{FF05}\u{FF12}\u{FF25}", false);
        check("%EF%BC%8E%EF%BC%8E", false);
        check("file\u{FF0E}txt", true);
        check("\u{FF05}41bc", true);
    }

    #[test]
    fn keys_round_trip_verbatim() {
        let prefix = ObjectPath::from("dev/alice/w1");
        let path = WorkspacePath::parse("notes/100% done.md").unwrap();
        let key = path.to_key(&prefix);
        assert_eq!(key.as_ref(), "dev/alice/w1/notes/100% done.md");
        assert_eq!(WorkspacePath::from_key(&key, &prefix).unwrap(), path);
        let outside = ObjectPath::from("dev/alice/w2/a");
        assert!(WorkspacePath::from_key(&outside, &prefix).is_err());
        let hostile = ObjectPath::parse("dev/alice/w1/%2E%2E/x").unwrap();
        assert!(WorkspacePath::from_key(&hostile, &prefix).is_err());
    }
}
