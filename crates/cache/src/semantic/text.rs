//! Prompt text: the NORMALIZED form (case, punctuation and spacing do not matter) and the
//! content guard that refuses a semantic hit when two prompts differ in what changes an answer.
//!
//! Embeddings place "enable TLS" next to "disable TLS" and "5 miles to km" next to "5 km to
//! miles" (GPTCache's own benchmark measured negations at 0.83–0.99 cosine). The guard looks
//! at the tokens that carry such differences and refuses the hit when they differ:
//! negations, numbers (digits and number words, so "five-year-old" equals "5-year-old"),
//! named entities (capitalised words and acronyms, wherever they stand), and a closed list of
//! contrast words — units, dates, languages and formats, quantifiers, comparatives and
//! opposite pairs (enable/disable, follow/unfollow, before/after…). For words of those kinds
//! that two prompts share, their order must match too ("5 miles to km" vs "5 km to miles",
//! "Python faster than Java" vs "Java faster than Python"). The idea is hydra's content-token
//! check; the word lists are ours.

use std::collections::BTreeSet;

/// The NORMALIZED form: lower case, punctuation as spaces (but inside numbers: "3.5",
/// "1,000", and "+" and "#": "C++", "C#"), apostrophes dropped, spaces collapsed.
#[must_use]
pub fn normalize(prompt: &str) -> String {
    let chars: Vec<char> = prompt.chars().collect();
    let mut out = String::with_capacity(prompt.len());
    for (i, c) in chars.iter().enumerate() {
        let between_digits = i > 0
            && i + 1 < chars.len()
            && chars[i - 1].is_ascii_digit()
            && chars[i + 1].is_ascii_digit();
        // "+" and "#" stay: "C++" and "C#" are not "C".
        if c.is_alphanumeric()
            || *c == '+'
            || *c == '#'
            || ((*c == '.' || *c == ',') && between_digits)
        {
            out.extend(c.to_lowercase());
        } else if *c == '\'' || *c == '’' {
        } else if !out.ends_with(' ') {
            out.push(' ');
        }
    }
    out.trim().to_owned()
}

/// Words of a prompt: (lower-cased word, whether it looks like a name where it stands).
fn words(prompt: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut sentence_start = true;
    let abbreviation = |w: &str| {
        [
            "dr.", "mr.", "mrs.", "ms.", "st.", "vs.", "prof.", "e.g.", "i.e.", "etc.", "no.",
            "jr.", "sr.",
        ]
        .contains(&w.to_lowercase().as_str())
    };
    for raw in prompt.split(|c: char| c.is_whitespace() || c == '/' || c == '-' || c == '—') {
        let ends_sentence = raw.ends_with(['.', '?', '!', ':']) && !abbreviation(raw);
        let trimmed: String = raw
            .trim_matches(|c: char| !c.is_alphanumeric() && c != '+' && c != '#')
            .to_owned();
        // "Australia's" → "Australia".
        let trimmed = trimmed
            .strip_suffix("'s")
            .or_else(|| trimmed.strip_suffix("’s"))
            .unwrap_or(&trimmed)
            .to_owned();
        if trimmed.is_empty() {
            continue;
        }
        let letters: Vec<char> = trimmed.chars().filter(|c| c.is_alphabetic()).collect();
        let capital = trimmed.chars().next().is_some_and(char::is_uppercase);
        let acronym = letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase());
        let inner_caps = trimmed.chars().skip(1).any(char::is_uppercase);
        let lower = stem(&trimmed.to_lowercase());
        let name = (acronym || inner_caps || (capital && !sentence_start))
            && lower != "i"
            && !STOP.contains(&lower.as_str());
        out.push((lower, name));
        sentence_start = ends_sentence;
    }
    out
}

/// A plural's singular, roughly ("sentences" → "sentence"; "is", "class" stay).
fn stem(w: &str) -> String {
    match w.strip_suffix('s') {
        Some(s) if w.len() > 3 && !s.ends_with('s') && !s.ends_with('u') && !s.ends_with('i') => {
            s.to_owned()
        }
        _ => w.to_owned(),
    }
}

/// Why the guard refused a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// One prompt is negated and the other is not.
    Negation,
    /// The numbers differ.
    Numbers,
    /// A name in one is missing from the other.
    Entity(String),
    /// A contrast word (unit, date, language, quantifier, opposite…) differs.
    Contrast(String),
    /// The same contrast words in another order.
    Order,
    /// A content word in one only (the strict guard, for the lexical fallback).
    Content(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Negation => write!(f, "negation differs"),
            Self::Numbers => write!(f, "numbers differ"),
            Self::Entity(e) => write!(f, "name {e:?} in one prompt only"),
            Self::Contrast(w) => match w.split_once('/') {
                Some((a, b)) => write!(f, "{a:?} against {b:?}"),
                None => write!(f, "{w:?} in one prompt only"),
            },
            Self::Order => write!(f, "same names or units in another order"),
            Self::Content(w) => write!(f, "content word {w:?} in one prompt only"),
        }
    }
}

/// Whether a semantic hit of `cached` for `asked` must be refused, and why.
#[must_use]
pub fn guard(asked: &str, cached: &str) -> Option<Refusal> {
    let (a, b) = (words(asked), words(cached));
    if negations(&a) != negations(&b) {
        return Some(Refusal::Negation);
    }
    if numbers(&a) != numbers(&b) {
        return Some(Refusal::Numbers);
    }
    let set =
        |w: &[(String, bool)]| -> BTreeSet<String> { w.iter().map(|(x, _)| x.clone()).collect() };
    let (sa, sb) = (set(&a), set(&b));
    for (words, other) in [(&a, &sb), (&b, &sa)] {
        if let Some((name, _)) = words
            .iter()
            .find(|(w, name)| *name && !other.contains(w) && !is_number(w))
        {
            return Some(Refusal::Entity(name.clone()));
        }
    }
    let (only_a, only_b): (Vec<&String>, Vec<&String>) =
        (sa.difference(&sb).collect(), sb.difference(&sa).collect());
    // Units, dates, languages and formats: one side is enough.
    for w in only_a.iter().chain(&only_b) {
        if in_any(w, &[UNITS, DATES, LANGUAGES, FORMATS]) {
            return Some(Refusal::Contrast((*w).clone()));
        }
    }
    // Quantifiers and comparatives: when both sides have one of their own ("all" vs "any",
    // "largest" vs "deepest"), unless they are synonyms ("fastest", "quickest").
    {
        let list = &[QUANTIFIERS, COMPARATIVES];
        let a = only_a.iter().find(|w| in_any(w, list));
        let b = only_b.iter().find(|w| in_any(w, list));
        if let (Some(x), Some(y)) = (a, b)
            && !synonyms(x, y)
        {
            return Some(Refusal::Contrast(format!("{x}/{y}")));
        }
    }
    for x in &only_a {
        for y in &only_b {
            if opposite(x, y) || opposite(y, x) {
                return Some(Refusal::Contrast(format!("{x}/{y}")));
            }
        }
    }
    // Shared names, units and languages: the same order within each kind ("5 miles to km",
    // "Python faster than Java", "from English to French").
    for class in [Class::Name, Class::Unit, Class::Language] {
        let ordered = |w: &[(String, bool)]| -> Vec<String> {
            dedup(
                &w.iter()
                    .filter(|(x, name)| {
                        classify(x, *name) == Some(class) && sa.contains(x) && sb.contains(x)
                    })
                    .map(|(x, _)| x.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let (oa, ob) = (ordered(&a), ordered(&b));
        if oa.len() >= 2 && oa != ob {
            return Some(Refusal::Order);
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Name,
    Unit,
    Language,
}

fn classify(w: &str, name: bool) -> Option<Class> {
    if in_any(w, &[LANGUAGES]) {
        Some(Class::Language)
    } else if in_any(w, &[UNITS]) {
        Some(Class::Unit)
    } else if name {
        Some(Class::Name)
    } else {
        None
    }
}

fn in_any(w: &str, lists: &[&[&str]]) -> bool {
    let stem = w.strip_suffix('s').unwrap_or(w);
    lists
        .iter()
        .any(|list| list.contains(&w) || list.contains(&stem))
}

fn synonyms(x: &str, y: &str) -> bool {
    SYNONYMS
        .iter()
        .any(|group| group.contains(&x) && group.contains(&y))
}

/// The guard plus: every content word (not a stop or filler word) in both. For embeddings
/// that only measure shared wording (the lexical fallback), where a swapped noun
/// ("quicksort"/"mergesort") would otherwise pass.
#[must_use]
pub fn strict_guard(asked: &str, cached: &str) -> Option<Refusal> {
    if let Some(r) = guard(asked, cached) {
        return Some(r);
    }
    let content = |t: &str| -> BTreeSet<String> {
        words(t)
            .into_iter()
            .map(|(w, _)| w)
            .filter(|w| !FILLER.contains(&w.as_str()) && !STOP.contains(&w.as_str()))
            .collect()
    };
    let (a, b) = (content(asked), content(cached));
    a.symmetric_difference(&b)
        .next()
        .map(|w| Refusal::Content(w.clone()))
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    v.iter()
        .filter(|x| seen.insert((*x).clone()))
        .cloned()
        .collect()
}

fn negations(words: &[(String, bool)]) -> usize {
    words.iter().filter(|(w, _)| is_negation(w)).count()
}

fn is_negation(w: &str) -> bool {
    NEGATIONS.contains(&w)
        || w.ends_with("n't")
        || w.ends_with("n’t")
        || w.ends_with("nt") && NEGATED_CONTRACTIONS.contains(&w)
}

/// The numbers of a prompt, as canonical strings (digits; number words as digits; ordinals
/// as "1st"), sorted.
fn numbers(words: &[(String, bool)]) -> Vec<String> {
    let mut out: Vec<String> = words.iter().flat_map(|(w, _)| number_values(w)).collect();
    out.sort();
    out
}

fn number_values(w: &str) -> Vec<String> {
    if w.chars().any(|c| c.is_ascii_digit()) {
        // "5", "3.5", "1,000", "2019", "2+2", "5pm", "1st": each run of digits (with its
        // point) is a value; a unit glued on is a word of its own kind; "st", "nd", "rd",
        // "th" after digits make an ordinal.
        let w: String = w.chars().filter(|c| *c != ',').collect();
        let mut out = Vec::new();
        let mut rest = w.as_str();
        while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(tail.len());
            let value = tail[..end].trim_end_matches('.');
            let after = &tail[end..];
            let ordinal = ["st", "nd", "rd", "th"]
                .iter()
                .any(|s| after.starts_with(s));
            out.push(if ordinal {
                format!("{value}#")
            } else {
                value.to_owned()
            });
            rest = after;
        }
        return out;
    }
    NUMBER_WORDS
        .iter()
        .find(|(word, _)| *word == w)
        .map(|(_, v)| vec![(*v).to_owned()])
        .unwrap_or_default()
}

fn is_number(w: &str) -> bool {
    !number_values(w).is_empty()
}

/// Whether `y` is the opposite of `x`: a listed pair, or `x` with a negating prefix.
fn opposite(x: &str, y: &str) -> bool {
    let stem = |w: &str| -> String {
        for suffix in ["ing", "ed", "es", "s"] {
            if let Some(s) = w.strip_suffix(suffix)
                && s.len() >= 3
            {
                return s.to_owned();
            }
        }
        w.to_owned()
    };
    let (sx, sy) = (stem(x), stem(y));
    if ["un", "dis", "de", "in", "im", "il", "ir", "non"]
        .iter()
        .any(|p| y.strip_prefix(p) == Some(x) || sy.strip_prefix(p) == Some(sx.as_str()))
    {
        return true;
    }
    OPPOSITES
        .iter()
        .any(|(a, b)| (sx == stem(a) || x == *a) && (sy == stem(b) || y == *b))
}

const NEGATIONS: &[&str] = &[
    "not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without",
    "cannot", "cant", "dont", "doesnt", "isnt", "arent", "wasnt", "werent", "wont", "shouldnt",
    "wouldnt", "couldnt", "didnt", "hasnt", "havent", "hadnt", "mustnt", "non",
];

const NEGATED_CONTRACTIONS: &[&str] = &[
    "cant", "dont", "doesnt", "isnt", "arent", "wasnt", "werent", "wont", "shouldnt", "wouldnt",
    "couldnt", "didnt", "hasnt", "havent", "hadnt", "mustnt",
];

const NUMBER_WORDS: &[(&str, &str)] = &[
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
    ("eleven", "11"),
    ("twelve", "12"),
    ("thirteen", "13"),
    ("fourteen", "14"),
    ("fifteen", "15"),
    ("sixteen", "16"),
    ("seventeen", "17"),
    ("eighteen", "18"),
    ("nineteen", "19"),
    ("twenty", "20"),
    ("thirty", "30"),
    ("forty", "40"),
    ("fifty", "50"),
    ("sixty", "60"),
    ("seventy", "70"),
    ("eighty", "80"),
    ("ninety", "90"),
    ("hundred", "100"),
    ("thousand", "1000"),
    ("million", "1000000"),
    ("billion", "1000000000"),
    ("dozen", "12"),
    ("half", "0.5"),
    ("quarter", "0.25"),
    ("twice", "x2"),
    ("double", "x2"),
    ("triple", "x3"),
    ("first", "1#"),
    ("second", "2#"),
    ("third", "3#"),
    ("fourth", "4#"),
    ("fifth", "5#"),
    ("single", "1"),
    ("pair", "2"),
];

const UNITS: &[&str] = &[
    "km",
    "kilometer",
    "kilometre",
    "mile",
    "meter",
    "metre",
    "cm",
    "centimeter",
    "mm",
    "millimeter",
    "inch",
    "inche",
    "foot",
    "feet",
    "yard",
    "kg",
    "kilogram",
    "gram",
    "g",
    "mg",
    "pound",
    "lb",
    "lbs",
    "ounce",
    "oz",
    "ton",
    "tonne",
    "liter",
    "litre",
    "ml",
    "milliliter",
    "gallon",
    "quart",
    "pint",
    "cup",
    "teaspoon",
    "tablespoon",
    "celsius",
    "fahrenheit",
    "kelvin",
    "degree",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "year",
    "decade",
    "century",
    "ms",
    "byte",
    "kb",
    "mb",
    "gb",
    "tb",
    "kib",
    "mib",
    "gib",
    "bit",
    "usd",
    "eur",
    "gbp",
    "jpy",
    "dollar",
    "euro",
    "yen",
    "cent",
    "percent",
    "mph",
    "kph",
    "kmh",
    "watt",
    "kw",
    "kwh",
    "volt",
    "amp",
    "hz",
    "ghz",
    "mhz",
    "acre",
    "hectare",
    "calorie",
    "kcal",
    "joule",
    "psi",
    "bar",
];

const DATES: &[&str] = &[
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "today",
    "tomorrow",
    "yesterday",
    "tonight",
    "weekend",
    "summer",
    "autumn",
    "winter",
    "bc",
    "am",
    "pm",
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "annually",
];

const LANGUAGES: &[&str] = &[
    "python",
    "rust",
    "java",
    "javascript",
    "typescript",
    "go",
    "golang",
    "c",
    "c++",
    "c#",
    "ruby",
    "php",
    "perl",
    "kotlin",
    "swift",
    "scala",
    "haskell",
    "elixir",
    "erlang",
    "lua",
    "r",
    "matlab",
    "julia",
    "bash",
    "shell",
    "powershell",
    "sql",
    "html",
    "css",
    "json",
    "yaml",
    "yml",
    "xml",
    "csv",
    "toml",
    "markdown",
    "pdf",
    "docx",
    "excel",
    "latex",
    "english",
    "french",
    "spanish",
    "german",
    "italian",
    "portuguese",
    "chinese",
    "mandarin",
    "japanese",
    "korean",
    "russian",
    "arabic",
    "hindi",
    "dutch",
    "swedish",
    "polish",
    "turkish",
    "greek",
    "hebrew",
    "linux",
    "windows",
    "macos",
    "mac",
    "ios",
    "android",
    "ubuntu",
    "debian",
    "postgres",
    "postgresql",
    "mysql",
    "sqlite",
    "mongodb",
    "redis",
    "react",
    "vue",
    "angular",
    "django",
    "flask",
    "rails",
    "spring",
    "docker",
    "kubernetes",
    "aws",
    "azure",
    "gcp",
    "chrome",
    "firefox",
    "safari",
    "iphone",
    "pixel",
];

/// Forms of an answer (one-sided contrast words, but not ordered).
const FORMATS: &[&str] = &[
    "word",
    "bullet",
    "table",
    "list",
    "paragraph",
    "sentence",
    "essay",
    "poem",
    "haiku",
    "tweet",
    "email",
    "letter",
    "formal",
    "informal",
    "casual",
];

const QUANTIFIERS: &[&str] = &[
    "all",
    "any",
    "some",
    "every",
    "each",
    "most",
    "few",
    "many",
    "several",
    "both",
    "either",
    "always",
    "sometimes",
    "often",
    "rarely",
    "usually",
    "fewer",
    "least",
    "exactly",
    "approximately",
    "under",
    "over",
    "everyone",
    "everything",
    "anyone",
    "anything",
    "someone",
    "something",
    "one",
    "only",
    "none",
];

const COMPARATIVES: &[&str] = &[
    "better",
    "worse",
    "best",
    "worst",
    "faster",
    "slower",
    "fastest",
    "slowest",
    "bigger",
    "smaller",
    "biggest",
    "smallest",
    "larger",
    "largest",
    "higher",
    "lower",
    "highest",
    "lowest",
    "cheaper",
    "cheapest",
    "expensive",
    "longer",
    "shorter",
    "longest",
    "shortest",
    "older",
    "younger",
    "oldest",
    "youngest",
    "heavier",
    "lighter",
    "heaviest",
    "lightest",
    "stronger",
    "weaker",
    "strongest",
    "weakest",
    "safer",
    "safest",
    "riskier",
    "easier",
    "easiest",
    "harder",
    "hardest",
    "hotter",
    "hottest",
    "colder",
    "coldest",
    "warmer",
    "cooler",
    "richer",
    "richest",
    "poorer",
    "poorest",
    "max",
    "min",
    "maximum",
    "minimum",
    "closest",
    "nearest",
    "farthest",
    "furthest",
    "deepest",
    "shallowest",
    "tallest",
    "shortest",
    "most",
    "least",
    "more",
    "less",
    "popular",
    "populous",
    "largest",
    "top",
    "bottom",
    "earliest",
    "latest",
    "newest",
    "quickest",
    "quicker",
];

/// Comparatives and quantifiers that say the same.
const SYNONYMS: &[&[&str]] = &[
    &["fastest", "quickest"],
    &["faster", "quicker"],
    &["biggest", "largest"],
    &["bigger", "larger"],
    &["every", "all", "each"],
];

const OPPOSITES: &[(&str, &str)] = &[
    ("enable", "disable"),
    ("increase", "decrease"),
    ("for", "against"),
    ("encrypt", "decrypt"),
    ("ascending", "descending"),
    ("add", "remove"),
    ("add", "delete"),
    ("gain", "lose"),
    ("gaining", "losing"),
    ("uppercase", "lowercase"),
    ("in", "out"),
    ("upgrade", "downgrade"),
    ("buy", "sell"),
    ("rise", "fall"),
    ("benefits", "risks"),
    ("benefits", "drawbacks"),
    ("encode", "decode"),
    ("stronger", "weaker"),
    ("show", "hide"),
    ("praising", "criticizing"),
    ("praise", "criticize"),
    ("good", "bad"),
    ("start", "stop"),
    ("more", "less"),
    ("maximize", "minimize"),
    ("import", "export"),
    ("up", "down"),
    ("accept", "decline"),
    ("accepting", "declining"),
    ("accept", "reject"),
    ("hot", "cold"),
    ("overheating", "cold"),
    ("win", "lose"),
    ("won", "lost"),
    ("before", "after"),
    ("above", "below"),
    ("push", "pull"),
    ("allow", "deny"),
    ("allow", "block"),
    ("open", "close"),
    ("upload", "download"),
    ("send", "receive"),
    ("input", "output"),
    ("on", "off"),
    ("first", "last"),
    ("begin", "end"),
    ("early", "late"),
    ("left", "right"),
    ("north", "south"),
    ("east", "west"),
    ("true", "false"),
    ("positive", "negative"),
    ("plus", "minus"),
    ("multiply", "divide"),
    ("join", "split"),
    ("create", "destroy"),
    ("hire", "fire"),
    ("forward", "backward"),
    ("lend", "borrow"),
    ("teach", "learn"),
    ("give", "take"),
    ("arrive", "depart"),
    ("dark", "light"),
    ("wet", "dry"),
    ("new", "old"),
    ("new", "used"),
    ("internal", "external"),
    ("public", "private"),
    ("read", "write"),
    ("client", "server"),
    ("frontend", "backend"),
    ("vertical", "horizontal"),
    ("vertically", "horizontally"),
    ("inner", "outer"),
    ("male", "female"),
    ("men", "women"),
    ("boy", "girl"),
    ("cat", "dog"),
    ("cats", "dogs"),
    ("safe", "dangerous"),
    ("legal", "banned"),
    ("healthy", "harmful"),
    ("sum", "product"),
    ("min", "max"),
    ("raise", "lower"),
    ("heat", "cool"),
    ("warm", "cool"),
    ("pro", "con"),
    ("pros", "cons"),
    ("speed", "slow"),
    ("include", "exclude"),
    ("with", "without"),
    ("to", "from"),
    ("into", "from"),
    ("sunrise", "sunset"),
    ("morning", "evening"),
    ("love", "hate"),
    ("like", "dislike"),
    ("agree", "disagree"),
    ("pass", "fail"),
    ("success", "failure"),
    ("profit", "loss"),
    ("strengths", "weaknesses"),
    ("strength", "weakness"),
    ("cause", "effect"),
    ("causes", "effects"),
    ("import", "export"),
    ("mount", "unmount"),
    ("connect", "disconnect"),
    ("attack", "defend"),
    ("start", "end"),
    ("beginning", "end"),
    ("favor", "against"),
    ("favour", "against"),
    ("store", "online"),
    ("offline", "online"),
    ("web", "mobile"),
    ("desktop", "mobile"),
    ("last", "next"),
    ("previous", "next"),
    ("buyer", "seller"),
    ("landlord", "tenant"),
    ("employer", "employee"),
];

/// Words that carry no content for the strict guard (besides [`STOP`]).
const FILLER: &[&str] = &[
    "i",
    "you",
    "we",
    "they",
    "he",
    "she",
    "them",
    "us",
    "our",
    "their",
    "its",
    "be",
    "been",
    "was",
    "were",
    "am",
    "will",
    "did",
    "does",
    "done",
    "have",
    "has",
    "had",
    "get",
    "got",
    "some",
    "just",
    "quick",
    "hey",
    "hi",
    "hello",
    "thank",
    "thanks",
    "need",
    "help",
    "want",
    "would",
    "like",
    "know",
    "let",
    "kindly",
    "possible",
    "way",
    "best",
    "there",
    "here",
    "with",
    "by",
    "at",
    "from",
    "into",
    "about",
    "as",
    "if",
    "then",
    "so",
    "any",
    "all",
    "some",
    "one",
    "da",
    "question",
    "remind",
    "wondering",
    "curiou",
];

/// Words that are never names, even capitalised mid-sentence.
const STOP: &[&str] = &[
    "a", "an", "the", "what", "how", "why", "when", "where", "who", "which", "is", "are", "do",
    "does", "can", "could", "should", "would", "please", "tell", "me", "give", "explain", "write",
    "list", "in", "on", "of", "for", "to", "and", "or", "my", "your", "it", "this", "that",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_normalize_ignores_case_punctuation_and_spacing_but_not_numbers() {
        assert_eq!(
            normalize("  What's the   Capital of France?? "),
            "whats the capital of france"
        );
        assert_eq!(normalize("Pi is 3.14, roughly"), "pi is 3.14 roughly");
        assert_eq!(normalize("1,000 km"), "1,000 km");
    }

    #[test]
    fn test_the_guard_refuses_what_changes_an_answer_and_passes_paraphrases() {
        for (a, b) in [
            (
                "How do I enable TLS in nginx?",
                "How do I disable TLS in nginx?",
            ),
            (
                "Which foods are gluten-free?",
                "Which foods are not gluten-free?",
            ),
            ("Is 91 a prime number?", "Is 97 a prime number?"),
            ("Convert 5 miles to km", "Convert 5 km to miles"),
            (
                "Tell me about Nikola Tesla.",
                "Tell me about Thomas Edison.",
            ),
            (
                "What was the GDP of France in 2019?",
                "What was the GDP of France in 2020?",
            ),
            ("Is Python faster than Java?", "Is Java faster than Python?"),
            ("Do all mammals lay eggs?", "Do any mammals lay eggs?"),
            ("Reply in JSON", "Reply in YAML"),
        ] {
            assert!(guard(a, b).is_some(), "{a} / {b}");
        }
        for (a, b) in [
            (
                "What's the capital of Australia?",
                "Which city is Australia's capital?",
            ),
            (
                "How do I enlarge the font in VS Code?",
                "How do I increase the font size in VS Code?",
            ),
            (
                "Summarize Hamlet in three sentences.",
                "Give me a three-sentence summary of Hamlet.",
            ),
            ("how old is a five-year-old", "How old is a 5-year-old?"),
            (
                "Python: how do I reverse a list?",
                "How do I reverse a list in Python?",
            ),
        ] {
            assert_eq!(guard(a, b), None, "{a} / {b}");
        }
    }
}
