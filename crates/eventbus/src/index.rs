//! A token trie from subscription filters to values, like NATS's sublist.
//!
//! Each trie level holds literal children in a hash map keyed by token, a separate `*` child,
//! and the values of filters that end in `>` at that level. Matching a subject walks at most
//! one literal and one `*` branch per token, so the cost depends on the subject's length and on
//! how many filters actually match, not on how many filters are stored. Matching does not
//! allocate (except [`SubjectIndex::matches`], which collects its result).
//!
//! Values are stored per filter: a value inserted under two filters that both match a subject
//! is reported twice. Callers insert one filter per subscription.

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::ControlFlow;

use crate::subject::SubjectFilter;

/// Maps subscription filters to values and finds the values whose filter matches a subject.
#[derive(Debug, Clone)]
pub struct SubjectIndex<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<T> {
    /// Children for literal tokens.
    literal: HashMap<Box<str>, Node<T>>,
    /// Child for a `*` token.
    star: Option<Box<Node<T>>>,
    /// Values of filters ending at this node.
    values: Vec<T>,
    /// Values of filters ending in `>` right below this node.
    full: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            literal: HashMap::new(),
            star: None,
            values: Vec::new(),
            full: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.values.is_empty()
            && self.full.is_empty()
    }
}

impl<T: Clone + Eq + Hash> Default for SubjectIndex<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + Eq + Hash> SubjectIndex<T> {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }

    /// Stores `value` under `filter`; false if that pair is already present.
    ///
    /// Costs O(k) in the number k of values already stored under the same filter.
    pub fn insert(&mut self, filter: &SubjectFilter, value: T) -> bool {
        let mut node = &mut self.root;
        let mut tokens = filter.tokens().peekable();
        let mut ends_in_full = false;
        while let Some(token) = tokens.next() {
            match token {
                ">" => {
                    // `>` is always the last token of a valid filter.
                    debug_assert!(tokens.peek().is_none());
                    ends_in_full = true;
                    break;
                }
                "*" => node = node.star.get_or_insert_with(Box::default),
                literal => {
                    // Look up first so an existing child does not cost a key allocation.
                    if !node.literal.contains_key(literal) {
                        node.literal.insert(literal.into(), Node::default());
                    }
                    node = node
                        .literal
                        .get_mut(literal)
                        .expect("child was just ensured");
                }
            }
        }
        let values = if ends_in_full {
            &mut node.full
        } else {
            &mut node.values
        };
        let inserted = push_unique(values, value);
        if inserted {
            self.len += 1;
        }
        inserted
    }

    /// Removes `value` from under `filter`, pruning nodes left empty; false if it was absent.
    pub fn remove(&mut self, filter: &SubjectFilter, value: &T) -> bool {
        let removed = remove_from(&mut self.root, &mut filter.tokens(), value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Every value whose filter matches `subject`, once per matching (filter, value) pair.
    pub fn matches(&self, subject: &str) -> Vec<T> {
        let mut out = Vec::new();
        self.for_each_match(subject, |v| out.push(v.clone()));
        out
    }

    /// Calls `f` for every value whose filter matches `subject`, without allocating.
    pub fn for_each_match(&self, subject: &str, mut f: impl FnMut(&T)) {
        let _ = self.visit(subject, &mut |v| {
            f(v);
            ControlFlow::Continue(())
        });
    }

    /// True when at least one filter matches `subject`.
    pub fn has_match(&self, subject: &str) -> bool {
        self.visit(subject, &mut |_| ControlFlow::Break(()))
            .is_break()
    }

    /// Number of stored (filter, value) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn visit(&self, subject: &str, f: &mut impl FnMut(&T) -> ControlFlow<()>) -> ControlFlow<()> {
        // A subject with an empty token matches no filter (see `SubjectFilter::matches`);
        // rejecting it here keeps the walk free of per-token checks.
        if subject.is_empty()
            || subject.starts_with('.')
            || subject.ends_with('.')
            || subject.contains("..")
        {
            return ControlFlow::Continue(());
        }
        visit_node(&self.root, subject, f)
    }
}

/// Walks `node` with the remaining (non-empty, well-formed) `subject`.
fn visit_node<T>(
    node: &Node<T>,
    subject: &str,
    f: &mut impl FnMut(&T) -> ControlFlow<()>,
) -> ControlFlow<()> {
    // `>` here matches this token and everything after it.
    for v in &node.full {
        f(v)?;
    }
    let (token, rest) = match subject.split_once('.') {
        Some((token, rest)) => (token, Some(rest)),
        None => (subject, None),
    };
    if let Some(child) = node.literal.get(token) {
        descend(child, rest, f)?;
    }
    if let Some(child) = &node.star {
        descend(child, rest, f)?;
    }
    ControlFlow::Continue(())
}

fn descend<T>(
    child: &Node<T>,
    rest: Option<&str>,
    f: &mut impl FnMut(&T) -> ControlFlow<()>,
) -> ControlFlow<()> {
    match rest {
        None => {
            for v in &child.values {
                f(v)?;
            }
            ControlFlow::Continue(())
        }
        Some(rest) => visit_node(child, rest, f),
    }
}

fn push_unique<T: Eq>(values: &mut Vec<T>, value: T) -> bool {
    if values.contains(&value) {
        return false;
    }
    values.push(value);
    true
}

fn remove_value<T: Eq>(values: &mut Vec<T>, value: &T) -> bool {
    match values.iter().position(|v| v == value) {
        Some(i) => {
            values.swap_remove(i);
            if values.is_empty() {
                // Give the memory back: filters come and go with subscriptions.
                *values = Vec::new();
            }
            true
        }
        None => false,
    }
}

fn remove_from<'a, T: Eq>(
    node: &mut Node<T>,
    tokens: &mut impl Iterator<Item = &'a str>,
    value: &T,
) -> bool {
    match tokens.next() {
        None => remove_value(&mut node.values, value),
        Some(">") => remove_value(&mut node.full, value),
        Some("*") => {
            let Some(child) = node.star.as_mut() else {
                return false;
            };
            let removed = remove_from(child, tokens, value);
            if child.is_empty() {
                node.star = None;
            }
            removed
        }
        Some(literal) => {
            let Some(child) = node.literal.get_mut(literal) else {
                return false;
            };
            let removed = remove_from(child, tokens, value);
            if child.is_empty() {
                node.literal.remove(literal);
            }
            removed
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn filter(s: &str) -> SubjectFilter {
        SubjectFilter::parse("filter", s).unwrap()
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn test_literal_star_and_full_wildcard_filters_all_match() {
        let mut index = SubjectIndex::new();
        assert!(index.insert(&filter("orders.eu.created"), 1));
        assert!(index.insert(&filter("orders.*.created"), 2));
        assert!(index.insert(&filter("orders.>"), 3));
        assert!(index.insert(&filter(">"), 4));
        assert!(index.insert(&filter("orders.us.created"), 5));
        assert!(index.insert(&filter("orders"), 6));
        assert_eq!(sorted(index.matches("orders.eu.created")), vec![1, 2, 3, 4]);
        assert_eq!(sorted(index.matches("orders.us.created")), vec![2, 3, 4, 5]);
        assert_eq!(sorted(index.matches("orders.eu")), vec![3, 4]);
        assert_eq!(sorted(index.matches("orders")), vec![4, 6]);
        assert_eq!(sorted(index.matches("billing.x")), vec![4]);
        assert!(index.matches("").is_empty());
        assert!(index.matches("orders..created").is_empty());
        assert_eq!(index.len(), 6);
    }

    #[test]
    fn test_insert_reports_duplicates_and_value_is_per_filter() {
        let mut index = SubjectIndex::new();
        assert!(index.insert(&filter("a.*"), 7));
        assert!(!index.insert(&filter("a.*"), 7));
        assert!(index.insert(&filter("a.>"), 7));
        assert!(index.insert(&filter("a.*"), 8));
        assert_eq!(index.len(), 3);
        // 7 is stored under two matching filters, so it is reported twice.
        assert_eq!(sorted(index.matches("a.b")), vec![7, 7, 8]);
    }

    #[test]
    fn test_remove_prunes_and_reports_absent_values() {
        let mut index = SubjectIndex::new();
        index.insert(&filter("a.b.c"), 1);
        index.insert(&filter("a.*.c"), 2);
        index.insert(&filter("a.>"), 3);
        assert!(!index.remove(&filter("a.b.c"), &2));
        assert!(!index.remove(&filter("x.y"), &1));
        assert!(!index.remove(&filter("a.*"), &2));
        assert!(index.remove(&filter("a.b.c"), &1));
        assert!(!index.remove(&filter("a.b.c"), &1));
        assert_eq!(sorted(index.matches("a.b.c")), vec![2, 3]);
        assert!(index.remove(&filter("a.*.c"), &2));
        assert!(index.remove(&filter("a.>"), &3));
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "every node was pruned");
    }

    #[test]
    fn test_has_match_and_for_each_match_agree_with_matches() {
        let mut index = SubjectIndex::new();
        index.insert(&filter("a.*"), 1);
        index.insert(&filter("a.b"), 2);
        assert!(index.has_match("a.b"));
        assert!(index.has_match("a.c"));
        assert!(!index.has_match("a"));
        assert!(!index.has_match("b.c"));
        let mut seen = Vec::new();
        index.for_each_match("a.b", |v| seen.push(*v));
        assert_eq!(sorted(seen), vec![1, 2]);
    }

    fn random_filter(rng: &mut StdRng) -> String {
        const TOKENS: [&str; 5] = ["a", "b", "c", "d", "*"];
        let n = rng.random_range(1..=5);
        let mut tokens: Vec<&str> = (0..n)
            .map(|_| TOKENS[rng.random_range(0..TOKENS.len())])
            .collect();
        if rng.random_bool(0.25) {
            *tokens.last_mut().unwrap() = ">";
        }
        tokens.join(".")
    }

    fn random_subject(rng: &mut StdRng) -> String {
        const TOKENS: [&str; 5] = ["a", "b", "c", "d", "e"];
        let n = rng.random_range(1..=6);
        (0..n)
            .map(|_| TOKENS[rng.random_range(0..TOKENS.len())])
            .collect::<Vec<_>>()
            .join(".")
    }

    #[test]
    fn test_index_agrees_with_brute_force_matching() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0001);
        let mut index = SubjectIndex::new();
        let mut live: Vec<(SubjectFilter, u32)> = Vec::new();
        for round in 0..20 {
            for value in 0..200 {
                let f = filter(&random_filter(&mut rng));
                // Values repeat across rounds so some filters hold several values.
                let value = value % 150 + round * 7;
                let fresh = !live.iter().any(|(g, v)| *g == f && *v == value);
                assert_eq!(index.insert(&f, value), fresh);
                if fresh {
                    live.push((f, value));
                }
            }
            // Remove about a third of what is stored, plus some pairs that were never there.
            for _ in 0..(live.len() / 3) {
                let i = rng.random_range(0..live.len());
                let (f, v) = live.swap_remove(i);
                assert!(index.remove(&f, &v));
                assert!(!index.remove(&f, &v));
            }
            assert_eq!(index.len(), live.len());
            for _ in 0..200 {
                let subject = random_subject(&mut rng);
                let want: Vec<u32> = live
                    .iter()
                    .filter(|(f, _)| f.matches(&subject))
                    .map(|(_, v)| *v)
                    .collect();
                assert_eq!(
                    sorted(index.matches(&subject)),
                    sorted(want.clone()),
                    "subject {subject:?}"
                );
                assert_eq!(index.has_match(&subject), !want.is_empty());
            }
        }
        for (f, v) in live.drain(..) {
            assert!(index.remove(&f, &v));
        }
        assert!(index.is_empty());
        assert!(index.root.is_empty());
    }
}
