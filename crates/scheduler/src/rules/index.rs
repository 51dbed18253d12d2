//! Routing an event to the rules it concerns, and choosing the subscriptions.
//!
//! A [`RuleSet`] indexes rules by subject filter in a trie over the filter's tokens (`*` one
//! token, `>` the rest), so an event reaches only the rules whose filter matches its subject —
//! whatever the number of rules — and then their type and header filters. [`plan`] groups
//! rules for the event bus: a rule whose filter another rule's filter covers (`orders.eu.*`
//! under `orders.>`) shares that one's subscription, so the engine opens one subscription per
//! maximal filter and routes what arrives through the index.

use std::collections::HashMap;

use agentmesh_proto::eventbus::v1 as bus;

use super::eval::{Variables, holds};
use super::model::{CompiledRule, Stimulus};

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    star: Option<Box<Node>>,
    /// Rules whose filter ends with `>` here.
    rest: Vec<usize>,
    /// Rules whose filter ends here.
    end: Vec<usize>,
}

/// Rules indexed by subject filter.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<CompiledRule>,
    root: Node,
}

impl RuleSet {
    /// Indexes `rules` (kept in this order).
    #[must_use]
    pub fn new(rules: Vec<CompiledRule>) -> Self {
        let mut root = Node::default();
        for (i, rule) in rules.iter().enumerate() {
            let mut node = &mut root;
            let tokens: Vec<&str> = rule.def.stimulus.subject.split('.').collect();
            for (t, token) in tokens.iter().enumerate() {
                match *token {
                    ">" if t == tokens.len() - 1 => {
                        node.rest.push(i);
                        break;
                    }
                    "*" => node = node.star.get_or_insert_with(Box::default),
                    literal => node = node.children.entry(literal.to_owned()).or_default(),
                }
                if t == tokens.len() - 1 {
                    node.end.push(i);
                }
            }
        }
        Self { rules, root }
    }

    /// The rules, in the order given.
    #[must_use]
    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    /// Indices of the rules whose stimulus matches `event` (subject, types, headers), in rule
    /// order.
    #[must_use]
    pub fn matching(&self, event: &bus::Event) -> Vec<usize> {
        let tokens: Vec<&str> = event.subject.split('.').collect();
        let mut out = Vec::new();
        let mut stack = vec![(&self.root, 0usize)];
        while let Some((node, depth)) = stack.pop() {
            if depth < tokens.len() {
                // `>` needs at least one more token.
                out.extend_from_slice(&node.rest);
                if let Some(child) = node.children.get(tokens[depth]) {
                    stack.push((child, depth + 1));
                }
                if let Some(star) = &node.star {
                    stack.push((star, depth + 1));
                }
            } else {
                out.extend_from_slice(&node.end);
            }
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|&i| stimulus_matches(&self.rules[i].def.stimulus, event));
        out
    }

    /// For one event: each matching rule and whether its condition holds (pure: no response
    /// runs). A rule without a condition holds.
    #[must_use]
    pub fn decide(
        &self,
        vars: &Variables,
        event: &bus::Event,
    ) -> Vec<(usize, Result<bool, String>)> {
        self.matching(event)
            .into_iter()
            .map(|i| {
                let rule = &self.rules[i];
                let held = match &rule.condition {
                    None => Ok(true),
                    Some(program) => holds(program, &vars.for_condition(&rule.def.name)),
                };
                (i, held)
            })
            .collect()
    }
}

/// The type and header filters of `stimulus` (its subject is matched by the index).
fn stimulus_matches(stimulus: &Stimulus, event: &bus::Event) -> bool {
    (stimulus.types.is_empty() || stimulus.types.contains(&event.r#type))
        && stimulus
            .headers
            .iter()
            .all(|(k, v)| event.headers.get(k) == Some(v))
}

/// Whether every subject `specific` matches is matched by `general`.
#[must_use]
pub fn covers(general: &str, specific: &str) -> bool {
    let g: Vec<&str> = general.split('.').collect();
    let s: Vec<&str> = specific.split('.').collect();
    for (i, token) in g.iter().enumerate() {
        match (*token, s.get(i)) {
            (">", Some(_)) => return true,
            (_, None) | (_, Some(&">")) => return false,
            ("*", Some(_)) => {}
            (literal, Some(other)) if literal == *other => {}
            _ => return false,
        }
    }
    g.len() == s.len()
}

/// The subscriptions for `rules`: one per maximal subject filter (not covered by another
/// rule's filter), with the rules under it. Types and headers go to the event bus when every
/// rule of the group has the same; otherwise the engine filters them.
#[must_use]
pub fn plan(rules: Vec<CompiledRule>) -> Vec<(Stimulus, Vec<CompiledRule>)> {
    let rules: Vec<CompiledRule> = rules.into_iter().flat_map(CompiledRule::entries).collect();
    let mut filters: Vec<String> = rules
        .iter()
        .map(|r| r.def.stimulus.subject.clone())
        .collect();
    filters.sort();
    filters.dedup();
    let maximal: Vec<String> = filters
        .iter()
        .filter(|f| !filters.iter().any(|g| g != *f && covers(g, f)))
        .cloned()
        .collect();
    let mut groups: Vec<(String, Vec<CompiledRule>)> =
        maximal.into_iter().map(|m| (m, Vec::new())).collect();
    for rule in rules {
        if let Some((_, members)) = groups
            .iter_mut()
            .find(|(m, _)| covers(m, &rule.def.stimulus.subject))
        {
            members.push(rule);
        }
    }
    groups
        .into_iter()
        .map(|(subject, members)| {
            let first = &members[0].def.stimulus;
            let same = members.iter().all(|r| {
                r.def.stimulus.types == first.types && r.def.stimulus.headers == first.headers
            });
            let stimulus = Stimulus {
                subject,
                types: if same {
                    first.types.clone()
                } else {
                    Vec::new()
                },
                headers: if same {
                    first.headers.clone()
                } else {
                    Default::default()
                },
            };
            (stimulus, members)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::model::{Action, ResponseDef, RuleDef, compile};

    fn rule(name: &str, subject: &str, types: &[&str], condition: &str) -> CompiledRule {
        compile(
            RuleDef {
                name: name.into(),
                stimulus: Stimulus {
                    subject: subject.into(),
                    types: types.iter().map(|t| (*t).to_owned()).collect(),
                    ..Stimulus::default()
                },
                condition: condition.into(),
                responses: vec![ResponseDef {
                    name: "r".into(),
                    when: String::new(),
                    action: Action::publish_to("out"),
                    delay_ms: 0,
                    fallback: None,
                    ..ResponseDef::default()
                }],
                ..RuleDef::default()
            },
            1,
        )
        .expect("compiles")
    }

    fn event(subject: &str, kind: &str) -> bus::Event {
        bus::Event {
            id: "e".into(),
            subject: subject.into(),
            r#type: kind.into(),
            data: br#"{"v": 5}"#.to_vec(),
            ..bus::Event::default()
        }
    }

    #[test]
    fn test_the_index_finds_exactly_the_rules_whose_filters_match() {
        let set = RuleSet::new(vec![
            rule("all", ">", &[], ""),
            rule("orders", "orders.>", &[], ""),
            rule("eu-created", "orders.eu.created", &[], ""),
            rule("any-created", "orders.*.created", &["order.created"], ""),
            rule("one-token", "orders.*", &[], ""),
            rule("other", "payments.>", &[], ""),
        ]);
        let names = |e: &bus::Event| -> Vec<&str> {
            set.matching(e)
                .into_iter()
                .map(|i| set.rules()[i].def.name.as_str())
                .collect()
        };
        assert_eq!(
            names(&event("orders.eu.created", "order.created")),
            ["all", "orders", "eu-created", "any-created"]
        );
        assert_eq!(
            names(&event("orders.eu.created", "other")),
            ["all", "orders", "eu-created"]
        );
        assert_eq!(
            names(&event("orders.eu", "")),
            ["all", "orders", "one-token"]
        );
        assert_eq!(names(&event("orders", "")), ["all"]);
        assert_eq!(names(&event("payments.x.y.z", "")), ["all", "other"]);
    }

    #[test]
    fn test_decide_evaluates_conditions_of_matching_rules_only() {
        let set = RuleSet::new(vec![
            rule("yes", "a.b", &[], "data.v > 1"),
            rule("no", "a.b", &[], "data.v > 10"),
            rule("elsewhere", "c.d", &[], "data.v > 1"),
            rule("broken", "a.*", &[], "data.missing > 1"),
        ]);
        let e = event("a.b", "");
        let vars = Variables::new(&e);
        let decided: Vec<(String, Result<bool, String>)> = set
            .decide(&vars, &e)
            .into_iter()
            .map(|(i, held)| (set.rules()[i].def.name.clone(), held))
            .collect();
        assert_eq!(decided.len(), 3, "{decided:?}");
        assert_eq!(decided[0], ("yes".to_owned(), Ok(true)));
        assert_eq!(decided[1], ("no".to_owned(), Ok(false)));
        assert!(decided[2].1.is_err());
    }

    #[test]
    fn test_covered_filters_share_one_subscription() {
        assert!(covers("orders.>", "orders.eu.created"));
        assert!(covers("orders.*.created", "orders.eu.created"));
        assert!(covers("orders.>", "orders.*"));
        assert!(!covers("orders.*", "orders.>"));
        assert!(!covers("orders.*", "orders.eu.created"));
        assert!(!covers("orders.>", "orders"));
        let groups = plan(vec![
            rule("a", "orders.>", &["x"], ""),
            rule("b", "orders.eu.created", &["y"], ""),
            rule("c", "payments.*", &["z"], ""),
            rule("d", "payments.*", &["z"], ""),
        ]);
        let summary: Vec<(String, Vec<String>, usize)> = groups
            .iter()
            .map(|(s, members)| (s.subject.clone(), s.types.clone(), members.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("orders.>".to_owned(), vec![], 2),
                ("payments.*".to_owned(), vec!["z".to_owned()], 2)
            ]
        );
    }
}
