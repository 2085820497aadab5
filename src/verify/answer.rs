//! Answers as comparable values: turning raw answer text ("$1,234.50", "\frac{1}{2}",
//! "18 dollars", "(B)") into an [`Answer`], and deciding when two answers are the same.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

/// A normalised answer: a number when the text reads as one, otherwise normalised text.
///
/// Build it with [`normalize`] so that equal answers compare equal with [`equivalent`]:
/// `Text` values are compared exactly, so they must already be normalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// A numeric value: integers, decimals and fractions (`a/b`, `\frac{a}{b}`) become the
    /// number they denote; a percent sign is dropped (50% is 50).
    Number(f64),
    /// Lowercased, whitespace-collapsed text; a multiple-choice letter is a single
    /// uppercase letter ("B").
    Text(String),
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Integers print without a trailing ".0" so "18" reads as written.
            Answer::Number(x) if x.fract() == 0.0 && x.abs() < 1e15 => write!(f, "{}", *x as i64),
            Answer::Number(x) => write!(f, "{x}"),
            Answer::Text(t) => f.write_str(t),
        }
    }
}

/// Relative tolerance for comparing numeric answers.
const REL_TOLERANCE: f64 = 1e-6;
/// Absolute tolerance, which decides near zero where a relative one is meaningless.
const ABS_TOLERANCE: f64 = 1e-9;

/// Whether two answers mean the same: numbers within a relative tolerance of 1e-6
/// (absolute 1e-9 near zero), texts exactly equal; a number never equals a text.
pub fn equivalent(a: &Answer, b: &Answer) -> bool {
    match (a, b) {
        (Answer::Number(x), Answer::Number(y)) => numbers_close(*x, *y),
        (Answer::Text(x), Answer::Text(y)) => x == y,
        _ => false,
    }
}

fn numbers_close(x: f64, y: f64) -> bool {
    if !x.is_finite() || !y.is_finite() {
        return x == y;
    }
    let diff = (x - y).abs();
    diff <= ABS_TOLERANCE || diff <= REL_TOLERANCE * x.abs().max(y.abs())
}

/// Normalise raw answer text into an [`Answer`].
///
/// Strips math delimiters (`$`, `\$`), currency symbols (€ £ ¥), `\text{…}` wrappers,
/// `\left`/`\right`, LaTeX spacing (`\!`, `\,`), degrees, percent signs (50% reads as 50),
/// thousands separators, a trailing period, a leading "x =", and unit words after a
/// number ("18 dollars", "5 km"). Fractions (`\frac{a}{b}`, `\dfrac`, `\tfrac`, `a/b`),
/// decimals and negative numbers (also with the unicode minus) become numbers. A lone
/// letter such as "(b)" becomes the choice letter "B". Anything else becomes lowercased
/// text with collapsed whitespace and without surrounding punctuation.
pub fn normalize(raw: &str) -> Answer {
    let cleaned = clean_latex(raw);
    if let Some(x) = parse_number(&cleaned) {
        return Answer::Number(x);
    }
    if let Some(letter) = choice_letter(&cleaned) {
        return Answer::Text(letter.to_string());
    }
    Answer::Text(normalize_text(&cleaned))
}

/// Removes the LaTeX and typographic decoration that does not change the value.
fn clean_latex(raw: &str) -> String {
    let mut s = trim_decoration(raw).to_string();
    s = s.replace("\\$", "").replace('$', "");
    for command in [
        "\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox",
    ] {
        s = unwrap_command(&s, command);
    }
    for degree in ["^{\\circ}", "^\\circ"] {
        s = s.replace(degree, "");
    }
    for command in ["\\left", "\\right", "\\displaystyle", "\\circ"] {
        s = remove_command(&s, command);
    }
    for token in [
        "\\!", "\\,", "\\;", "\\:", "\\ ", "\\%", "%", "°", "€", "£", "¥",
    ] {
        s = s.replace(token, "");
    }
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    // LaTeX writes a thousands separator as "{,}" so it does not add space.
    s = s.replace("{,}", ",");
    s = s.replace('\u{2212}', "-");
    let mut out = trim_decoration(&s).to_string();
    out = strip_wrapping_braces(&out).to_string();
    out = strip_assignment(&out).to_string();
    trim_decoration(&out).to_string()
}

/// Trims whitespace, markdown emphasis and trailing periods.
fn trim_decoration(s: &str) -> &str {
    let mut s = s.trim_matches(|c: char| c.is_whitespace() || c == '*');
    while let Some(rest) = s.strip_suffix('.') {
        s = rest.trim_matches(|c: char| c.is_whitespace() || c == '*');
    }
    s
}

/// Replaces every `\command{inner}` with `inner`. An unbalanced one loses only its prefix.
fn unwrap_command(s: &str, command: &str) -> String {
    let opener = format!("{command}{{");
    if !s.contains(&opener) {
        return s.to_string();
    }
    let pairs = brace_pairs(s);
    // Byte ranges to drop: each "\command{" and the "}" that closes it.
    let mut cuts: Vec<Range<usize>> = Vec::new();
    for (pos, _) in s.match_indices(&opener) {
        let open = pos + opener.len() - 1;
        cuts.push(pos..open + 1);
        if let Some(close) = closing_brace(&pairs, open) {
            cuts.push(close..close + 1);
        }
    }
    cuts.sort_by_key(|cut| cut.start);
    let mut out = String::with_capacity(s.len());
    let mut kept_from = 0;
    for cut in cuts {
        out.push_str(&s[kept_from..cut.start]);
        kept_from = cut.end;
    }
    out.push_str(&s[kept_from..]);
    out
}

/// Removes `\command` where it is not the start of a longer command name
/// (so removing `\left` keeps `\leftarrow`).
fn remove_command(s: &str, command: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(command) {
        let after = &rest[pos + command.len()..];
        let longer_name = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic());
        out.push_str(&rest[..pos]);
        if longer_name {
            out.push_str(command);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// All balanced `{`…`}` pairs as (open, close) byte offsets, sorted by open. One pass,
/// so texts with many unclosed braces stay linear. Scanning bytes is safe: `{` and `}`
/// never occur inside a multi-byte UTF-8 character.
pub(crate) fn brace_pairs(text: &str) -> Vec<(usize, usize)> {
    let mut open_stack = Vec::new();
    let mut pairs = Vec::new();
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'{' => open_stack.push(i),
            b'}' => {
                if let Some(open) = open_stack.pop() {
                    pairs.push((open, i));
                }
            }
            _ => {}
        }
    }
    pairs.sort_unstable();
    pairs
}

/// The byte offset of the `}` closing the `{` at `open`, from [`brace_pairs`].
pub(crate) fn closing_brace(pairs: &[(usize, usize)], open: usize) -> Option<usize> {
    let i = pairs.binary_search_by_key(&open, |&(o, _)| o).ok()?;
    Some(pairs[i].1)
}

/// "{{3}}" → "3": removes braces that wrap the whole string.
fn strip_wrapping_braces(s: &str) -> &str {
    let pairs = brace_pairs(s);
    let (mut start, mut end) = (0, s.len());
    while s[start..end].starts_with('{') && closing_brace(&pairs, start) == Some(end - 1) {
        let inner = &s[start + 1..end - 1];
        let trimmed = inner.trim();
        if trimmed.is_empty() {
            return "";
        }
        start = start + 1 + (inner.len() - inner.trim_start().len());
        end = start + trimmed.len();
    }
    &s[start..end]
}

/// "x = 5" → "5": drops a leading short variable name and an equals sign.
fn strip_assignment(s: &str) -> &str {
    static ASSIGNMENT: OnceLock<Regex> = OnceLock::new();
    let re = ASSIGNMENT.get_or_init(|| compile(r"^[A-Za-z][A-Za-z0-9_{}]{0,5}\s*=\s*"));
    match re.find(s) {
        Some(m) if m.end() < s.len() => &s[m.end()..],
        _ => s,
    }
}

/// Reads a cleaned string as a number, allowing one trailing unit word or phrase.
fn parse_number(s: &str) -> Option<f64> {
    let core = strip_unit_suffix(s);
    parse_plain(core)
        .or_else(|| parse_frac(core))
        .or_else(|| parse_slash(core))
        .or_else(|| parse_parenthesized(core))
        .filter(|x| x.is_finite())
}

/// "18 dollars" → "18", "5 km/h" → "5", "12 m^2" → "12". Returns `s` when there is no unit.
fn strip_unit_suffix(s: &str) -> &str {
    static UNIT: OnceLock<Regex> = OnceLock::new();
    let re =
        UNIT.get_or_init(|| compile(r"^(.*[0-9}])\s*\p{L}[\p{L}\s./'’]*(?:\^\{?[23]\}?|[²³])?$"));
    match re.captures(s).and_then(|c| c.get(1)) {
        Some(core) => core.as_str().trim_end(),
        None => s,
    }
}

/// Plain decimal with an optional sign and optional thousands separators.
fn parse_plain(s: &str) -> Option<f64> {
    static PLAIN: OnceLock<Regex> = OnceLock::new();
    let re =
        PLAIN.get_or_init(|| compile(r"^[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)$"));
    if !re.is_match(s) {
        return None;
    }
    s.replace(',', "").parse::<f64>().ok()
}

/// `\frac{a}{b}`, `-\frac{a}{b}` and the shorthand `\frac12`.
fn parse_frac(s: &str) -> Option<f64> {
    static FRAC: OnceLock<Regex> = OnceLock::new();
    let re = FRAC
        .get_or_init(|| compile(r"^([+-]?)\s*\\frac\s*(?:\{([^{}]+)\}\s*\{([^{}]+)\}|(\d)(\d))$"));
    let caps = re.captures(s)?;
    let numerator = caps.get(2).or_else(|| caps.get(4))?.as_str();
    let denominator = caps.get(3).or_else(|| caps.get(5))?.as_str();
    let value = divide(
        parse_plain(numerator.trim())?,
        parse_plain(denominator.trim())?,
    )?;
    let negative = caps.get(1).is_some_and(|m| m.as_str() == "-");
    Some(if negative { -value } else { value })
}

/// "3/4", "-1/2", "1.5/3".
fn parse_slash(s: &str) -> Option<f64> {
    let (numerator, denominator) = s.split_once('/')?;
    divide(
        parse_plain(numerator.trim())?,
        parse_plain(denominator.trim())?,
    )
}

/// "(-5)" → -5.
fn parse_parenthesized(s: &str) -> Option<f64> {
    let inner = s.strip_prefix('(')?.strip_suffix(')')?.trim();
    parse_plain(inner)
        .or_else(|| parse_frac(inner))
        .or_else(|| parse_slash(inner))
}

fn divide(numerator: f64, denominator: f64) -> Option<f64> {
    if denominator == 0.0 {
        None
    } else {
        Some(numerator / denominator)
    }
}

/// "B", "(b)", "[C]", "d." and "E)" name a choice letter; returned uppercase.
pub(crate) fn choice_letter(s: &str) -> Option<char> {
    static LETTER: OnceLock<Regex> = OnceLock::new();
    let re =
        LETTER.get_or_init(|| compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):]?)$"));
    captured_letter(&re.captures(s.trim())?)
}

/// The letter in the first of capture groups 1–3 that matched, upper-cased (the choice
/// patterns spell "(B)", "[B]" and "B." as three alternatives).
pub(crate) fn captured_letter(caps: &regex::Captures<'_>) -> Option<char> {
    let letter = caps
        .get(1)
        .or_else(|| caps.get(2))
        .or_else(|| caps.get(3))?;
    letter
        .as_str()
        .chars()
        .next()
        .map(|c| c.to_ascii_uppercase())
}

/// Lowercase, single spaces, no space after commas, no surrounding punctuation.
fn normalize_text(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let lowered = collapsed.to_lowercase().replace(", ", ",");
    lowered
        .trim_matches(|c: char| c.is_whitespace() || ".,;:!?*\"'`".contains(c))
        .to_string()
}

/// Compiles one of this module's fixed patterns.
pub(crate) fn compile(pattern: &str) -> Regex {
    // The patterns are constants of this crate, covered by tests; a failure here is a
    // bug in the crate, not something user input can cause.
    Regex::new(pattern).expect("built-in regex pattern is valid")
}
