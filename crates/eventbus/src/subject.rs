//! Subjects and subscription filters.
//!
//! A subject is a dot-separated list of tokens, as in NATS: `orders.eu.created`. A token is
//! non-empty and made of visible ASCII (`0x21..=0x7E`) other than `.`, `*` and `>`, so
//! `_INBOX`, `a-b` and `x:y` are fine while spaces, tabs and non-ASCII are not. Subjects are at
//! most [`MAX_SUBJECT_LEN`] bytes and [`MAX_SUBJECT_TOKENS`] tokens.
//!
//! A [`SubjectFilter`] may also use two wildcards, each standing alone as a whole token: `*`
//! matches exactly one token and `>` matches one or more remaining tokens (so it must be last).
//! `orders.*.created` matches `orders.eu.created`; `orders.>` matches `orders.eu` and
//! `orders.eu.created` but not `orders`.

use std::fmt;

use crate::error::FieldViolation;

/// Longest subject or filter, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Most tokens in a subject or filter.
pub const MAX_SUBJECT_TOKENS: usize = 16;

const SUBJECT_EXAMPLE: &str = "subjects are dot-separated tokens such as orders.eu.created";
const FILTER_EXAMPLE: &str =
    "filters are dot-separated tokens such as orders.eu.created, orders.*.created or orders.>";

/// Checks a publish subject: valid tokens and no wildcards.
pub fn validate_subject(field: &str, subject: &str) -> Result<(), FieldViolation> {
    check(subject, false).map_err(|description| FieldViolation::new(field, description))
}

/// A validated subscription filter, possibly with `*` and `>` wildcards.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubjectFilter {
    raw: String,
}

impl SubjectFilter {
    /// Parses and validates a filter; `field` names it in the violation.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldViolation> {
        check(s, true).map_err(|description| FieldViolation::new(field, description))?;
        Ok(Self { raw: s.to_owned() })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The filter's tokens, in order (wildcards included as `*` and `>`).
    pub fn tokens(&self) -> std::str::Split<'_, char> {
        self.raw.split('.')
    }

    /// True when the filter has no wildcard, i.e. matches exactly one subject.
    pub fn is_literal(&self) -> bool {
        !self.tokens().any(is_wildcard)
    }

    /// True when `subject` matches the filter. Does not allocate. A subject with an empty
    /// token matches nothing.
    pub fn matches(&self, subject: &str) -> bool {
        let mut rest = subject.split('.');
        for token in self.tokens() {
            match token {
                ">" => {
                    let mut any = false;
                    for t in rest.by_ref() {
                        if t.is_empty() {
                            return false;
                        }
                        any = true;
                    }
                    return any;
                }
                "*" => match rest.next() {
                    Some(t) if !t.is_empty() => {}
                    _ => return false,
                },
                literal => {
                    if rest.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        rest.next().is_none()
    }

    /// True when every subject matched by `other` is also matched by `self`, e.g. `orders.>`
    /// covers `orders.*.created`.
    pub fn covers(&self, other: &SubjectFilter) -> bool {
        let mut theirs = other.tokens();
        for mine in self.tokens() {
            let Some(their) = theirs.next() else {
                // `other` is shorter: it matches subjects `self` cannot.
                return false;
            };
            match (mine, their) {
                // Whatever remains of `other` (at least `their`) matches one or more tokens.
                (">", _) => return true,
                (_, ">") => return false,
                ("*", _) => {}
                (m, t) => {
                    // A literal covers only the same literal (never `*`).
                    if m != t {
                        return false;
                    }
                }
            }
        }
        theirs.next().is_none()
    }

    /// True when some subject matches both filters.
    pub fn overlaps(&self, other: &SubjectFilter) -> bool {
        let mut mine = self.tokens();
        let mut theirs = other.tokens();
        loop {
            match (mine.next(), theirs.next()) {
                (None, None) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                // `>` absorbs what remains of the other side, which is at least one token.
                (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
                (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
                (Some(a), Some(b)) => {
                    if a != b {
                        return false;
                    }
                }
            }
        }
    }
}

impl fmt::Display for SubjectFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl AsRef<str> for SubjectFilter {
    fn as_ref(&self) -> &str {
        &self.raw
    }
}

fn is_wildcard(token: &str) -> bool {
    token == "*" || token == ">"
}

/// A byte allowed in a literal token.
fn is_token_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7E) && !matches!(b, b'.' | b'*' | b'>')
}

/// Validates a subject (`wildcards == false`) or a filter; the error is the description.
fn check(s: &str, wildcards: bool) -> Result<(), String> {
    let example = if wildcards {
        FILTER_EXAMPLE
    } else {
        SUBJECT_EXAMPLE
    };
    if s.is_empty() {
        return Err(format!("is empty ({example})"));
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(format!("is {} bytes; at most {MAX_SUBJECT_LEN}", s.len()));
    }
    let count = s.split('.').count();
    if count > MAX_SUBJECT_TOKENS {
        return Err(format!("has {count} tokens; at most {MAX_SUBJECT_TOKENS}"));
    }
    for (i, token) in s.split('.').enumerate() {
        let n = i + 1;
        if token.is_empty() {
            return Err(format!("token {n} is empty ({example})"));
        }
        if is_wildcard(token) {
            if !wildcards {
                return Err(
                    "wildcards (* and >) are only allowed in subscription filters".to_owned(),
                );
            }
            if token == ">" && n != count {
                return Err(format!(
                    "> must be the last token (it is token {n} of {count}); use * to match one token"
                ));
            }
            continue;
        }
        if token.contains(['*', '>']) {
            return Err(if wildcards {
                format!(
                    "token {n} ({token:?}) mixes a wildcard with other characters; * and > must stand alone as a whole token"
                )
            } else {
                "wildcards (* and >) are only allowed in subscription filters".to_owned()
            });
        }
        if let Some(c) = token
            .chars()
            .find(|&c| !c.is_ascii() || !is_token_byte(c as u8))
        {
            return Err(format!(
                "token {n} contains {c:?} (U+{:04X}); tokens are visible ASCII other than '.', '*' and '>'",
                u32::from(c)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(s: &str) -> SubjectFilter {
        SubjectFilter::parse("filter", s).unwrap()
    }

    fn subject_error(s: &str) -> String {
        validate_subject("event.subject", s)
            .unwrap_err()
            .description
    }

    fn filter_error(s: &str) -> String {
        SubjectFilter::parse("filter", s).unwrap_err().description
    }

    #[test]
    fn test_filter_matching_table() {
        let table: &[(&str, &str, bool)] = &[
            ("a", "a", true),
            ("a", "b", false),
            ("a", "a.b", false),
            ("a.b", "a", false),
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b.d", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.x.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.*.c", "a.c", false),
            ("a.*.c", "a.b.x.c", false),
            ("*.*", "a.b", true),
            ("*.*", "a", false),
            ("*.*", "a.b.c", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("a.>", "a", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            ("a.>", "b.c", false),
            ("a.*.>", "a.b", false),
            ("a.*.>", "a.b.c", true),
            ("a.*.>", "a.b.c.d", true),
            ("*.>", "a", false),
            ("*.>", "a.b", true),
            ("_INBOX.*", "_INBOX.x1", true),
            ("a-b.x:y", "a-b.x:y", true),
            // `*` never matches an empty token; subjects with empty tokens match nothing.
            ("a.*", "a.", false),
            ("*", "", false),
            (">", "", false),
            ("a.>", "a.b.", false),
            ("a.>", "a..b", false),
            ("a", "", false),
        ];
        for &(f, s, want) in table {
            assert_eq!(filter(f).matches(s), want, "filter {f:?} subject {s:?}");
        }
    }

    #[test]
    fn test_star_matches_exactly_one_token() {
        let f = filter("orders.*.created");
        assert!(f.matches("orders.eu.created"));
        assert!(!f.matches("orders.created"));
        assert!(!f.matches("orders.eu.west.created"));
    }

    #[test]
    fn test_full_wildcard_needs_at_least_one_token() {
        assert!(!filter("orders.>").matches("orders"));
        assert!(filter("orders.>").matches("orders.eu"));
        assert!(filter(">").matches("anything.at.all"));
    }

    #[test]
    fn test_is_literal_only_without_wildcards() {
        assert!(filter("a.b.c").is_literal());
        assert!(!filter("a.*.c").is_literal());
        assert!(!filter("a.>").is_literal());
        assert_eq!(filter("a.*").as_str(), "a.*");
        assert_eq!(filter("a.*").to_string(), "a.*");
    }

    #[test]
    fn test_covers_table() {
        let table: &[(&str, &str, bool)] = &[
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.*", "a.b", true),
            ("a.b", "a.*", false),
            ("a.*", "a.*", true),
            ("a.*", "a.>", false),
            ("a.>", "a.b", true),
            ("a.>", "a.*", true),
            ("a.>", "a.*.c", true),
            ("a.>", "a.>", true),
            ("a.>", "a.b.>", true),
            ("a.b.>", "a.>", false),
            ("a.>", "a", false),
            ("a.>", ">", false),
            (">", "a", true),
            (">", "a.>", true),
            (">", ">", true),
            (">", "*", true),
            ("*", ">", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.b", "a.b", true),
            ("*.b", "a.*", false),
            ("*.*", "a.*", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.*.>", "a.b.c", true),
            ("a.*.>", "a.b", false),
            ("a.b.c", "a.b", false),
            ("a.b", "a.b.c", false),
        ];
        for &(mine, theirs, want) in table {
            assert_eq!(
                filter(mine).covers(&filter(theirs)),
                want,
                "{mine:?} covers {theirs:?}"
            );
        }
    }

    #[test]
    fn test_overlaps_table() {
        let table: &[(&str, &str, bool)] = &[
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.*", "a.b", true),
            ("a.*", "*.b", true),
            ("a.*", "b.*", false),
            ("a.*", "a.b.c", false),
            ("a.>", "a", false),
            ("a.>", "a.b.c", true),
            ("a.>", "*.b", true),
            ("a.>", "*", false),
            ("a.>", "b.>", false),
            (">", "a", true),
            (">", "a.*.c", true),
            ("*.*", "a.>", true),
            ("*.*.*", "a.b", false),
            ("a.*.c", "a.b.*", true),
            ("a.*.c", "a.b.d", false),
        ];
        for &(a, b, want) in table {
            assert_eq!(filter(a).overlaps(&filter(b)), want, "{a:?} overlaps {b:?}");
            assert_eq!(filter(b).overlaps(&filter(a)), want, "{b:?} overlaps {a:?}");
        }
    }

    #[test]
    fn test_covers_agrees_with_matching_on_samples() {
        let filters = [
            "a", "a.b", "a.*", "a.>", "*", "*.b", "*.*", ">", "a.*.c", "a.b.>", "*.>",
        ];
        let subjects = [
            "a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c", "a.b.d", "b.b.b", "a.b.c.d",
        ];
        for mine in filters {
            for theirs in filters {
                let (m, t) = (filter(mine), filter(theirs));
                if m.covers(&t) {
                    for s in subjects {
                        assert!(
                            !t.matches(s) || m.matches(s),
                            "{mine:?} covers {theirs:?} but misses {s:?}"
                        );
                    }
                }
                let witnessed = subjects.iter().any(|s| m.matches(s) && t.matches(s));
                if witnessed {
                    assert!(m.overlaps(&t), "{mine:?} and {theirs:?} share a subject");
                }
            }
        }
    }

    #[test]
    fn test_valid_subjects_pass() {
        for s in [
            "a",
            "orders.eu.created",
            "_INBOX.abc123",
            "a-b.x:y",
            "A~!@#$%^&()",
        ] {
            validate_subject("event.subject", s).unwrap();
        }
        let max = "a.".repeat(MAX_SUBJECT_TOKENS - 1) + "a";
        validate_subject("event.subject", &max).unwrap();
        validate_subject("event.subject", &"x".repeat(MAX_SUBJECT_LEN)).unwrap();
    }

    #[test]
    fn test_subject_errors_say_what_is_wrong_and_the_bound() {
        assert_eq!(
            subject_error("orders..created"),
            "token 2 is empty (subjects are dot-separated tokens such as orders.eu.created)"
        );
        assert!(subject_error("").starts_with("is empty"));
        assert!(subject_error(".a").starts_with("token 1 is empty"));
        assert!(subject_error("a.").starts_with("token 2 is empty"));
        assert_eq!(
            subject_error("orders.*"),
            "wildcards (* and >) are only allowed in subscription filters"
        );
        assert_eq!(
            subject_error("orders.>"),
            "wildcards (* and >) are only allowed in subscription filters"
        );
        assert_eq!(
            subject_error("orders.eu*"),
            "wildcards (* and >) are only allowed in subscription filters"
        );
        assert_eq!(subject_error(&"x".repeat(300)), "is 300 bytes; at most 256");
        let many = "a.".repeat(MAX_SUBJECT_TOKENS) + "a";
        assert_eq!(subject_error(&many), "has 17 tokens; at most 16");
        assert!(subject_error("a b").starts_with("token 1 contains ' ' (U+0020)"));
        assert!(subject_error("a.b\tc").starts_with("token 2 contains '\\t' (U+0009)"));
        assert!(subject_error("a.é").starts_with("token 2 contains 'é' (U+00E9)"));
        let v = validate_subject("event.subject", "").unwrap_err();
        assert_eq!(v.field, "event.subject");
    }

    #[test]
    fn test_filter_errors_reject_misplaced_or_mixed_wildcards() {
        assert!(filter_error("a.>.b").starts_with("> must be the last token"));
        assert!(filter_error(">.a").starts_with("> must be the last token"));
        assert!(filter_error("a*").contains("mixes a wildcard"));
        assert!(filter_error("a.>x").contains("token 2"));
        assert!(filter_error("a.**").contains("mixes a wildcard"));
        assert!(filter_error("a..b").starts_with("token 2 is empty"));
        assert!(filter_error("").starts_with("is empty"));
        assert_eq!(filter_error(&"x".repeat(257)), "is 257 bytes; at most 256");
        assert!(filter_error("a b").contains("visible ASCII"));
        let v = SubjectFilter::parse("subscribe.filter", "a..b").unwrap_err();
        assert_eq!(v.field, "subscribe.filter");
    }
}
