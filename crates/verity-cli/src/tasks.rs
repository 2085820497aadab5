//! Synthetic verifiable tasks (arithmetic, letter counting, sorting, linear equations,
//! string reversal) for tests and for training without a dataset. Items use the GSM8K
//! JSONL shape, `{"question": ..., "answer": "#### <value>"}`, so `MathVerifier` (and
//! `ExactMatch` on [`TaskItem::final_answer`]) check them like GSM8K. Generation is
//! deterministic for a given seed.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The kinds of task; `difficulty` scales digits, list and word lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// "What is 23 + 45 * 6?" with the usual precedence.
    Arithmetic,
    /// "How many times does the letter "b" appear in "abcabd"?"
    CountLetter,
    /// "Sort these numbers in ascending order: 5, -3, 9." → "-3, 5, 9"
    SortList,
    /// "Solve for x: 3x + 4 = 19." → 5
    LinearEquation,
    /// "Reverse the letters of "abcd"." → "dcba"
    ReverseWord,
}

impl TaskKind {
    pub const ALL: [TaskKind; 5] = [
        TaskKind::Arithmetic,
        TaskKind::CountLetter,
        TaskKind::SortList,
        TaskKind::LinearEquation,
        TaskKind::ReverseWord,
    ];

    fn name(self) -> &'static str {
        match self {
            TaskKind::Arithmetic => "arithmetic",
            TaskKind::CountLetter => "count_letter",
            TaskKind::SortList => "sort_list",
            TaskKind::LinearEquation => "linear_equation",
            TaskKind::ReverseWord => "reverse_word",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task kind {0:?} (expected arithmetic, count_letter, sort_list, linear_equation or reverse_word)")]
pub struct ParseTaskKindError(pub String);

impl FromStr for TaskKind {
    type Err = ParseTaskKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s.trim())
            .ok_or_else(|| ParseTaskKindError(s.to_string()))
    }
}

/// One question with its GSM8K-style answer, `#### <value>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskItem {
    pub question: String,
    pub answer: String,
}

impl TaskItem {
    fn new(question: String, value: impl fmt::Display) -> Self {
        TaskItem {
            question,
            answer: format!("#### {value}"),
        }
    }

    /// The value after "#### ".
    pub fn final_answer(&self) -> &str {
        self.answer
            .strip_prefix("####")
            .unwrap_or(&self.answer)
            .trim()
    }

    /// The item as one JSONL line.
    pub fn to_json_line(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// `n` items of `kind` at `difficulty` (taken as 1 when 0, at most 10), the same for the
/// same seed.
pub fn generate(kind: TaskKind, difficulty: u32, n: usize, seed: u64) -> Vec<TaskItem> {
    let difficulty = difficulty.clamp(1, 10);
    // Mixing kind and difficulty into the seed keeps their streams independent.
    let kind_index = TaskKind::ALL.iter().position(|&k| k == kind).unwrap_or(0) as u64;
    let salt = (kind_index << 8 | u64::from(difficulty)).wrapping_mul(0xA076_1D64_78BD_642F);
    let mut rng = SplitMix64::new(seed ^ salt);
    (0..n)
        .map(|_| match kind {
            TaskKind::Arithmetic => arithmetic(&mut rng, difficulty),
            TaskKind::CountLetter => count_letter(&mut rng, difficulty),
            TaskKind::SortList => sort_list(&mut rng, difficulty),
            TaskKind::LinearEquation => linear_equation(&mut rng, difficulty),
            TaskKind::ReverseWord => reverse_word(&mut rng, difficulty),
        })
        .collect()
}

/// SplitMix64: tiny, fast, and good enough for generating exercises.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n ≥ 1; the modulo bias is negligible here).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in lo..=hi.
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        let span = hi.abs_diff(lo) + 1;
        lo + self.below(span) as i64
    }

    /// A number with exactly `digits` digits (0..=9 for one digit).
    fn with_digits(&mut self, digits: u32) -> i64 {
        if digits <= 1 {
            return self.between(0, 9);
        }
        let low = 10i64.pow(digits - 1);
        self.between(low, low * 10 - 1)
    }

    fn letter(&mut self, alphabet_size: u64) -> char {
        char::from(b'a' + self.below(alphabet_size.min(26)) as u8)
    }
}

fn arithmetic(rng: &mut SplitMix64, difficulty: u32) -> TaskItem {
    let operands = 2 + (difficulty as usize - 1) / 3;
    let digits = (1 + (difficulty - 1) / 2).min(5);
    let first = rng.with_digits(digits);
    let mut expression = first.to_string();
    // Evaluated left to right with precedence: `sum` of finished terms, `term` is the
    // product being built.
    let mut sum: i64 = 0;
    let mut term: i64 = first;
    for _ in 1..operands {
        let op = ['+', '-', '*'][rng.below(3) as usize];
        // Small multipliers keep every value exact in an f64.
        let operand = rng.with_digits(if op == '*' { digits.min(2) } else { digits });
        expression.push_str(&format!(" {op} {operand}"));
        match op {
            '*' => term *= operand,
            '+' => {
                sum += term;
                term = operand;
            }
            _ => {
                sum += term;
                term = -operand;
            }
        }
    }
    TaskItem::new(format!("What is {expression}?"), sum + term)
}

fn count_letter(rng: &mut SplitMix64, difficulty: u32) -> TaskItem {
    let alphabet = 4 + u64::from(difficulty);
    let length = 4 + 2 * difficulty as usize;
    let word: String = (0..length).map(|_| rng.letter(alphabet)).collect();
    let target = rng.letter(alphabet);
    let count = word.chars().filter(|&c| c == target).count();
    TaskItem::new(
        format!("How many times does the letter \"{target}\" appear in \"{word}\"?"),
        count,
    )
}

fn sort_list(rng: &mut SplitMix64, difficulty: u32) -> TaskItem {
    let length = 3 + difficulty as usize;
    let max = 10i64.pow(1 + difficulty / 3) - 1;
    let min = if difficulty >= 5 { -max } else { 0 };
    let values: Vec<i64> = (0..length).map(|_| rng.between(min, max)).collect();
    let mut sorted = values.clone();
    sorted.sort_unstable();
    TaskItem::new(
        format!(
            "Sort these numbers in ascending order: {}. Give the sorted list separated by commas.",
            join(&values)
        ),
        join(&sorted),
    )
}

fn join(values: &[i64]) -> String {
    values
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn linear_equation(rng: &mut SplitMix64, difficulty: u32) -> TaskItem {
    let d = i64::from(difficulty);
    let x = rng.between(-5 * d, 5 * d);
    let magnitude = rng.between(1, d + 1);
    let a = if rng.below(2) == 0 {
        magnitude
    } else {
        -magnitude
    };
    let b = rng.between(-10 * d, 10 * d);
    let c = a * x + b;
    let coefficient = match a {
        1 => String::new(),
        -1 => "-".to_string(),
        _ => a.to_string(),
    };
    let constant = match b {
        0 => String::new(),
        b if b > 0 => format!(" + {b}"),
        b => format!(" - {}", -b),
    };
    TaskItem::new(format!("Solve for x: {coefficient}x{constant} = {c}."), x)
}

fn reverse_word(rng: &mut SplitMix64, difficulty: u32) -> TaskItem {
    let length = 3 + difficulty as usize;
    let word: String = (0..length).map(|_| rng.letter(26)).collect();
    let reversed: String = word.chars().rev().collect();
    TaskItem::new(format!("Reverse the letters of \"{word}\"."), reversed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use verity::verify::{ExactMatch, MathVerifier, Verifier};

    #[test]
    fn generation_is_deterministic() {
        for kind in TaskKind::ALL {
            for difficulty in [0, 1, 5, 10] {
                let a = generate(kind, difficulty, 20, 7);
                assert_eq!(a, generate(kind, difficulty, 20, 7), "{kind}");
                assert_ne!(a, generate(kind, difficulty, 20, 8), "{kind}");
                assert_eq!(a.len(), 20);
            }
        }
        assert_ne!(
            generate(TaskKind::Arithmetic, 3, 5, 1)[0].question,
            generate(TaskKind::LinearEquation, 3, 5, 1)[0].question
        );
    }

    /// Evaluates "a op b op c" with * before + and -, independently of the generator:
    /// first multiplies out products, then adds up the terms.
    fn evaluate(expression: &str) -> i64 {
        let tokens: Vec<&str> = expression.split_whitespace().collect();
        let mut terms: Vec<i64> = Vec::new();
        let mut signs: Vec<i64> = vec![1];
        let mut product: i64 = tokens[0].parse().expect("number");
        for pair in tokens[1..].chunks(2) {
            let value: i64 = pair[1].parse().expect("number");
            match pair[0] {
                "*" => product *= value,
                sign => {
                    terms.push(product);
                    signs.push(if sign == "+" { 1 } else { -1 });
                    product = value;
                }
            }
        }
        terms.push(product);
        terms.iter().zip(&signs).map(|(t, s)| t * s).sum()
    }

    /// The `nth` (0-based) double-quoted string in `text`.
    fn quoted(text: &str, nth: usize) -> &str {
        text.split('"').nth(2 * nth + 1).expect("quoted text")
    }

    /// Recomputes an item's answer from its question alone.
    fn solve(kind: TaskKind, question: &str) -> String {
        match kind {
            TaskKind::Arithmetic => {
                let expression = question
                    .strip_prefix("What is ")
                    .and_then(|q| q.strip_suffix('?'))
                    .expect("arithmetic question");
                evaluate(expression).to_string()
            }
            TaskKind::CountLetter => {
                let letter = quoted(question, 0);
                let word = quoted(question, 1);
                word.matches(letter).count().to_string()
            }
            TaskKind::SortList => {
                let list = question
                    .split(": ")
                    .nth(1)
                    .and_then(|rest| rest.split(". ").next())
                    .expect("list");
                let mut values: Vec<i64> = list
                    .split(", ")
                    .map(|v| v.parse().expect("number"))
                    .collect();
                values.sort();
                values
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
            TaskKind::LinearEquation => solve_linear(question).to_string(),
            TaskKind::ReverseWord => quoted(question, 0).chars().rev().collect(),
        }
    }

    /// Solves "Solve for x: ax + b = c." by reading a, b and c.
    fn solve_linear(question: &str) -> i64 {
        let equation = question
            .strip_prefix("Solve for x: ")
            .and_then(|q| q.strip_suffix('.'))
            .expect("equation");
        let (lhs, rhs) = equation.split_once(" = ").expect("equals sign");
        let (coefficient, constant) = lhs.split_once('x').expect("x");
        let a: i64 = match coefficient {
            "" => 1,
            "-" => -1,
            c => c.parse().expect("coefficient"),
        };
        let b: i64 = match constant.trim() {
            "" => 0,
            c => c.replace(' ', "").parse().expect("constant"),
        };
        let c: i64 = rhs.parse().expect("right-hand side");
        assert_ne!(a, 0);
        assert_eq!((c - b) % a, 0, "{question}");
        (c - b) / a
    }

    #[test]
    fn every_answer_is_correct() {
        for kind in TaskKind::ALL {
            for difficulty in 1..=10 {
                for item in generate(kind, difficulty, 50, u64::from(difficulty) * 31) {
                    assert!(item.answer.starts_with("#### "), "{item:?}");
                    assert_eq!(item.final_answer(), solve(kind, &item.question), "{item:?}");
                }
            }
        }
    }

    #[test]
    fn verifiers_check_generated_answers() {
        for kind in TaskKind::ALL {
            for item in generate(kind, 6, 30, 99) {
                let value = item.final_answer();
                let math = MathVerifier;
                assert_eq!(
                    math.verify(&item.answer, &item.answer).reward,
                    1.0,
                    "{item:?}"
                );
                let sentence = format!("Working it out... The answer is {value}.");
                assert_eq!(math.verify(&sentence, &item.answer).reward, 1.0, "{item:?}");
                let boxed = format!("\\boxed{{{value}}}");
                assert_eq!(math.verify(&boxed, &item.answer).reward, 1.0, "{item:?}");
                let wrong = format!("#### {value}9");
                assert_eq!(math.verify(&wrong, &item.answer).reward, 0.0, "{item:?}");
                let padded = format!(" {value}\n");
                let exact = ExactMatch::default();
                assert_eq!(exact.verify(&padded, item.final_answer()).reward, 1.0);
            }
        }
    }

    #[test]
    fn items_are_gsm8k_jsonl() {
        let item = &generate(TaskKind::Arithmetic, 2, 1, 5)[0];
        let line = item.to_json_line().expect("serialises");
        assert!(line.starts_with("{\"question\":"), "{line}");
        let back: TaskItem = serde_json::from_str(&line).expect("parses");
        assert_eq!(&back, item);
    }

    #[test]
    fn kinds_parse_and_display() {
        for kind in TaskKind::ALL {
            assert_eq!(kind.to_string().parse(), Ok(kind));
        }
        assert!("poetry".parse::<TaskKind>().is_err());
    }
}
