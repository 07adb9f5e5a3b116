//! Pure routing helpers: which session a host or a path names, the path the app sees, and the
//! background-path patterns.

/// A session named by `/s/{session}[/rest]`: the session and the rest (`None` for `/s/{session}`
/// without the slash, which is redirected).
pub fn split_session_path(path: &str) -> Option<(&str, Option<&str>)> {
    let after = path.strip_prefix("/s/")?;
    match after.find('/') {
        Some(slash) => Some((&after[..slash], Some(&after[slash..]))),
        None => Some((after, None)),
    }
}

/// The session of a `{session}.{base_domain}` host (the port, if any, ignored).
pub fn session_of_host<'a>(host: &'a str, base_domain: &str) -> Option<&'a str> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let label = name.strip_suffix(base_domain)?.strip_suffix('.')?;
    (!label.is_empty() && !label.contains('.')).then_some(label)
}

/// A background-path pattern: `*` matches within one segment, `**` any run (slashes too).
#[derive(Debug, Clone)]
pub struct PathPattern {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Segment,
    Any,
}

impl PathPattern {
    pub fn new(pattern: &str) -> PathPattern {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '*' {
                literal.push(c);
                continue;
            }
            if !literal.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut literal)));
            }
            if chars.peek() == Some(&'*') {
                chars.next();
                tokens.push(Token::Any);
            } else {
                tokens.push(Token::Segment);
            }
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        PathPattern { tokens }
    }

    /// Whether `path` (no query) matches the whole pattern.
    pub fn matches(&self, path: &str) -> bool {
        matches_from(&self.tokens, path)
    }
}

fn matches_from(tokens: &[Token], text: &str) -> bool {
    match tokens.split_first() {
        None => text.is_empty(),
        Some((Token::Literal(literal), rest)) => text.strip_prefix(literal.as_str()).is_some_and(|after| matches_from(rest, after)),
        Some((wildcard, rest)) => {
            // Try every split point the wildcard may end at (paths are short).
            let mut end = 0;
            loop {
                if matches_from(rest, &text[end..]) {
                    return true;
                }
                let Some(next) = text[end..].chars().next() else { return false };
                if *wildcard == Token::Segment && next == '/' {
                    return false;
                }
                end += next.len_utf8();
            }
        }
    }
}

/// Whether the app-visible `path` is background traffic.
pub fn is_background(patterns: &[PathPattern], path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    patterns.iter().any(|pattern| pattern.matches(path))
}

/// The path and query the app receives: without the `/s/{session}` prefix when `strip`, else the
/// whole request path.
pub fn upstream_path_and_query(original_path: &str, rest: Option<&str>, query: Option<&str>, strip: bool) -> String {
    let path = match (strip, rest) {
        (true, Some(rest)) => rest,
        (true, None) => "/",
        (false, _) => original_path,
    };
    match query {
        Some(query) if !query.is_empty() => format!("{path}?{query}"),
        _ => path.to_owned(),
    }
}

/// `query` without the `berth_token` parameter (the first hop's), `None` when nothing is left.
pub fn query_without(query: Option<&str>, name: &str) -> Option<String> {
    let kept: Vec<&str> = query?.split('&').filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(name)).collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_paths_and_hosts() {
        assert_eq!(split_session_path("/s/abc/x/y"), Some(("abc", Some("/x/y"))));
        assert_eq!(split_session_path("/s/abc/"), Some(("abc", Some("/"))));
        assert_eq!(split_session_path("/s/abc"), Some(("abc", None)));
        assert_eq!(split_session_path("/api/x"), None);
        assert_eq!(session_of_host("abc.berth.test", "berth.test"), Some("abc"));
        assert_eq!(session_of_host("abc.berth.test:8700", "berth.test"), Some("abc"));
        assert_eq!(session_of_host("berth.test", "berth.test"), None);
        assert_eq!(session_of_host("a.b.berth.test", "berth.test"), None);
        assert_eq!(session_of_host("abcberth.test", "berth.test"), None);
        assert_eq!(session_of_host("127.0.0.1:8700", "berth.test"), None);
    }

    #[track_caller]
    fn check(pattern: &str, path: &str, expected: bool) {
        assert_eq!(PathPattern::new(pattern).matches(path), expected, "{pattern} vs {path}");
    }

    #[test]
    fn background_patterns() {
        check("/status", "/status", true);
        check("/status", "/status/x", false);
        check("/api/*/poll", "/api/jobs/poll", true);
        check("/api/*/poll", "/api/a/b/poll", false);
        check("/events/**", "/events/a/b", true);
        check("/**.json", "/a/b/c.json", true);
        check("/health*", "/healthz", true);
        check("/health*", "/health/x", false);
        assert!(is_background(&[PathPattern::new("/status")], "/status?x=1"));
    }

    #[test]
    fn upstream_paths() {
        assert_eq!(upstream_path_and_query("/s/a/x", Some("/x"), Some("q=1"), true), "/x?q=1");
        assert_eq!(upstream_path_and_query("/s/a/x", Some("/x"), None, false), "/s/a/x");
        assert_eq!(upstream_path_and_query("/", None, Some(""), true), "/");
        assert_eq!(query_without(Some("berth_token=t&a=1"), "berth_token").as_deref(), Some("a=1"));
        assert_eq!(query_without(Some("berth_token=t"), "berth_token"), None);
    }
}
