//! Finding the final answer in a completion: the last `\boxed{…}`, else a GSM8K
//! `#### x` line, else "the answer is x", else a clear multiple-choice letter, else the
//! last number in the text. A reasoning model's `<think>…</think>` block is not the answer:
//! only the text after the last `</think>` is searched, and a completion still inside an
//! unclosed `<think>` has none.

use super::answer::{
    brace_pairs, captured_letter, choice_letter, closing_brace, compile, normalize, Answer,
};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::OnceLock;

/// Which pattern an answer was found by, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AnswerSource {
    /// `\boxed{…}` or `\fbox{…}` (the last one that closes).
    Boxed,
    /// A GSM8K answer line `#### x`.
    GsmHashes,
    /// "the answer is x", "final answer: x" (case-insensitive).
    AnswerIs,
    /// A multiple-choice letter such as "Answer: (B)".
    Choice,
    /// The last number in the text, as a fallback.
    LastNumber,
}

/// An answer found in a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The answer exactly as written: always equal to `text[span]`.
    pub raw: String,
    /// `raw` normalised.
    pub answer: Answer,
    /// Byte range of the answer inside the text; on char boundaries.
    pub span: Range<usize>,
    /// Which pattern found it.
    pub source: AnswerSource,
}

/// Finds the final answer in `text`, or `None` when there is none.
///
/// An occurrence whose content is empty (`\boxed{}`, "the answer is.") is skipped and the
/// search goes on with earlier occurrences and then lower-priority patterns.
pub fn extract_answer(text: &str) -> Option<Extracted> {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    let start = match (text.rfind(CLOSE), text.contains(OPEN)) {
        (Some(end), _) => end + CLOSE.len(),
        // Cut off while thinking (max_tokens, an early stop): no final answer yet.
        (None, true) => return None,
        (None, false) => 0,
    };
    let mut found = extract_from(&text[start..])?;
    found.span = found.span.start + start..found.span.end + start;
    Some(found)
}

/// [`extract_answer`] on text without a thinking block.
fn extract_from(text: &str) -> Option<Extracted> {
    find_boxed(text)
        .or_else(|| find_gsm_hashes(text))
        .or_else(|| find_answer_is(text))
        .or_else(|| find_choice(text))
        .or_else(|| find_last_number(text))
}

/// Builds an [`Extracted`] from a byte range, trimmed of padding; `None` when it is empty.
fn build(text: &str, start: usize, end: usize, source: AnswerSource) -> Option<Extracted> {
    let span = trim_span(text, start, end)?;
    let raw = text.get(span.clone())?.to_string();
    let answer = normalize(&raw);
    if matches!(&answer, Answer::Text(t) if t.is_empty()) {
        return None;
    }
    Some(Extracted {
        raw,
        answer,
        span,
        source,
    })
}

/// Shrinks `start..end` past surrounding whitespace and markdown `*`.
fn trim_span(text: &str, start: usize, end: usize) -> Option<Range<usize>> {
    let segment = text.get(start..end)?;
    let is_padding = |c: char| c.is_whitespace() || c == '*';
    let lead = segment.len() - segment.trim_start_matches(is_padding).len();
    let kept_end = segment.trim_end_matches(is_padding).len();
    (lead < kept_end).then(|| start + lead..start + kept_end)
}

// ---- \boxed{…} ----

fn find_boxed(text: &str) -> Option<Extracted> {
    let mut after_commands: Vec<usize> = ["\\boxed", "\\fbox"]
        .iter()
        .flat_map(|cmd| text.match_indices(cmd).map(|(i, _)| i + cmd.len()))
        .collect();
    if after_commands.is_empty() {
        return None;
    }
    after_commands.sort_unstable_by(|a, b| b.cmp(a));
    let pairs = brace_pairs(text);
    after_commands.into_iter().find_map(|after| {
        let rest = text.get(after..)?;
        let open = after + (rest.len() - rest.trim_start().len());
        if !rest.trim_start().starts_with('{') {
            return None;
        }
        let close = closing_brace(&pairs, open)?;
        build(text, open + 1, close, AnswerSource::Boxed)
    })
}

// ---- #### x ----

/// A `####` line counts when its value is a number or it is the last line of the text,
/// so that markdown headings ("#### Step 1") in the middle of a completion do not.
fn find_gsm_hashes(text: &str) -> Option<Extracted> {
    let positions: Vec<usize> = text.match_indices("####").map(|(i, _)| i).collect();
    positions.into_iter().rev().find_map(|pos| {
        let after = text.get(pos + 4..)?;
        let start = pos + 4 + after.bytes().take_while(|&b| b == b'#').count();
        let line = text.get(start..)?;
        let end = line.find('\n').map_or(text.len(), |i| start + i);
        let found = build(text, start, end, AnswerSource::GsmHashes)?;
        let is_last_line = text.get(end..).is_some_and(|rest| rest.trim().is_empty());
        (is_last_line || matches!(found.answer, Answer::Number(_))).then_some(found)
    })
}

// ---- the answer is x ----

fn find_answer_is(text: &str) -> Option<Extracted> {
    static ANSWER_IS: OnceLock<Regex> = OnceLock::new();
    let re = ANSWER_IS
        .get_or_init(|| compile(r"(?i)\b(?:final\s+answer\s*(?:is\b|:)|answer\s+is\b)\s*:?"));
    let starts: Vec<usize> = re.find_iter(text).map(|m| m.end()).collect();
    starts.into_iter().rev().find_map(|start| {
        let line = text.get(start..)?;
        let line_end = line.find('\n').map_or(text.len(), |i| start + i);
        let end = sentence_end(text, start, line_end);
        let found = build(text, start, end, AnswerSource::AnswerIs)?;
        Some(leading_number(text, &found).unwrap_or(found))
    })
}

/// "42 because 6*7 is 42" → "42": when a phrase does not read as a value but starts
/// with a number followed by words, the number is the answer.
fn leading_number(text: &str, found: &Extracted) -> Option<Extracted> {
    if matches!(found.answer, Answer::Number(_)) {
        return None;
    }
    let first_token = found.raw.split_whitespace().next()?;
    let rest = found.raw[first_token.len()..].trim_start();
    if !rest.starts_with(char::is_alphabetic) {
        return None;
    }
    let start = found.span.start;
    let candidate = build(
        text,
        start,
        start + first_token.len(),
        AnswerSource::AnswerIs,
    )?;
    matches!(candidate.answer, Answer::Number(_)).then_some(candidate)
}

/// Where the sentence that starts at `start` ends: at ". ", "!", "?", ";" or ", word",
/// but not inside braces, brackets, parentheses or `$…$`, and not at a decimal point.
fn sentence_end(text: &str, start: usize, end: usize) -> usize {
    let Some(segment) = text.get(start..end) else {
        return end;
    };
    let mut depth = 0i32;
    let mut in_math = false;
    // Counting the dollars ahead keeps this linear on lines full of "$".
    let mut dollars_ahead = segment.matches('$').count();
    let mut chars = segment.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let after = &segment[i + c.len_utf8()..];
        match c {
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            '$' => {
                dollars_ahead = dollars_ahead.saturating_sub(1);
                // A "$" with no partner after it is a currency sign, not math.
                if in_math || dollars_ahead > 0 {
                    in_math = !in_math;
                }
            }
            // An escaped character ("\$", "\{") is text, not a delimiter.
            '\\' => {
                if chars.next().is_some_and(|(_, escaped)| escaped == '$') {
                    dollars_ahead = dollars_ahead.saturating_sub(1);
                }
                continue;
            }
            _ => {}
        }
        if depth > 0 || in_math {
            continue;
        }
        let ends_here = match c {
            '.' | '!' | '?' => after.is_empty() || after.starts_with(char::is_whitespace),
            ';' => true,
            ',' => {
                after.starts_with(char::is_whitespace)
                    && after.trim_start().starts_with(char::is_alphabetic)
            }
            _ => false,
        };
        if ends_here {
            return start + i;
        }
    }
    end
}

// ---- Answer: (B) ----

/// A choice letter after "answer", "option" or "choice" that stands alone: in
/// parentheses or brackets, or an uppercase A–J followed by punctuation or the line end
/// (so "Answer: A total of 5" is not read as choice A).
fn find_choice(text: &str) -> Option<Extracted> {
    let caps = choice_regex().captures_iter(text).last()?;
    let letter = caps
        .get(1)
        .or_else(|| caps.get(2))
        .or_else(|| caps.get(3))?;
    build(text, letter.start(), letter.end(), AnswerSource::Choice)
}

fn choice_regex() -> &'static Regex {
    static CHOICE: OnceLock<Regex> = OnceLock::new();
    CHOICE.get_or_init(|| {
        compile(
            r"(?i:\b(?:answer|option|choice))\s*(?:(?i:is)\s*)?[:\-*]*\s*(?:\(([A-Ja-j])\)|\[([A-Ja-j])\]|([A-J])(?:[.):,;]|[ \t]*(?:\r?\n|$)))",
        )
    })
}

/// The choice letter (A–J) a completion settles on, if any: the extracted answer when
/// it is a letter, a letter leading the extracted answer ("(B) 42"), or a choice pattern
/// anywhere in the text.
pub fn extract_choice(text: &str) -> Option<char> {
    let in_range = |c: &char| ('A'..='J').contains(c);
    if let Some(found) = extract_answer(text) {
        if let Answer::Text(t) = &found.answer {
            if let Some(letter) = choice_letter(t).filter(in_range) {
                return Some(letter);
            }
        }
        if let Some(letter) = leading_choice_letter(&found.raw).filter(in_range) {
            return Some(letter);
        }
    }
    let caps = choice_regex().captures_iter(text).last()?;
    captured_letter(&caps)
}

/// "(B) 42" → B, "C. blue" → C.
fn leading_choice_letter(raw: &str) -> Option<char> {
    static LEADING: OnceLock<Regex> = OnceLock::new();
    let re = LEADING
        .get_or_init(|| compile(r"^\s*\$?(?:\(([A-Ja-j])\)|\[([A-Ja-j])\]|([A-J])(?:[.):]|\s|$))"));
    captured_letter(&re.captures(raw)?)
}

// ---- last number ----

/// Numbers as written: `\frac{a}{b}`, fractions, decimals, thousands separators, a sign.
fn number_regex() -> &'static Regex {
    static NUMBER: OnceLock<Regex> = OnceLock::new();
    NUMBER.get_or_init(|| {
        compile(concat!(
            r"[-\x{2212}]?\\[dt]?frac\{[-\x{2212}]?\d+(?:\.\d+)?\}\{\d+(?:\.\d+)?\}",
            r"|[-\x{2212}]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?",
        ))
    })
}

fn find_last_number(text: &str) -> Option<Extracted> {
    let m = number_regex().find_iter(text).last()?;
    let start = start_without_hyphen(text, m.start(), m.as_str());
    build(text, start, m.end(), AnswerSource::LastNumber)
}

/// Every number in `text`, in order, read as the last-number fallback reads one (so an
/// answer can be compared with the numbers of its question).
pub fn numbers_in(text: &str) -> Vec<Answer> {
    number_regex()
        .find_iter(text)
        .filter_map(|m| {
            let start = start_without_hyphen(text, m.start(), m.as_str());
            build(text, start, m.end(), AnswerSource::LastNumber).map(|e| e.answer)
        })
        .collect()
}

/// A minus sign glued to a preceding word or digit ("5-3", "2023-01") is a hyphen.
fn start_without_hyphen(text: &str, start: usize, matched: &str) -> usize {
    let Some(sign) = matched
        .chars()
        .next()
        .filter(|&c| c == '-' || c == '\u{2212}')
    else {
        return start;
    };
    let previous = text
        .get(..start)
        .and_then(|before| before.chars().next_back());
    if previous.is_some_and(|c| c.is_alphanumeric() || c == ')') {
        start + sign.len_utf8()
    } else {
        start
    }
}
