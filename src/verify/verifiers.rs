//! Verifiers: turn a completion and a reference into a reward in [0, 1].

use super::answer::{choice_letter, equivalent, normalize, Answer};
use super::extract::{extract_answer, extract_choice, AnswerSource};
use regex::Regex;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The outcome of one verification.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// In [0, 1]; 1 means correct.
    pub reward: f64,
    /// Why the reward is not 1 (or was adjusted); `None` for a plain pass.
    pub reason: Option<String>,
}

impl Verdict {
    /// Reward 1, no reason.
    pub fn correct() -> Self {
        Verdict {
            reward: 1.0,
            reason: None,
        }
    }

    /// Reward 0, with the reason it failed.
    pub fn wrong(reason: impl Into<String>) -> Self {
        Verdict {
            reward: 0.0,
            reason: Some(reason.into()),
        }
    }

    /// True when the reward is (at least) 1; partial credit is not correct.
    pub fn is_correct(&self) -> bool {
        self.reward >= 1.0
    }
}

/// Checks a completion against a reference. Implementations never panic on odd text.
pub trait Verifier: Send + Sync {
    /// Scores `completion` (the model's text) against `reference` (the expected answer or
    /// a worked solution; how it is read depends on the verifier).
    fn verify(&self, completion: &str, reference: &str) -> Verdict;
}

/// Why a verifier could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The pattern given to [`RegexVerifier::new`] does not compile.
    #[error("invalid regex {pattern:?}: {source}")]
    InvalidRegex {
        /// The pattern as given.
        pattern: String,
        /// The regex crate's complaint.
        #[source]
        source: regex::Error,
    },
}

/// The answer a reference stands for: the `#### x` or `\boxed{x}` in a worked solution
/// (a GSM8K answer field), else the whole reference normalised as a bare value
/// ("72", "\frac{1}{2}", "Paris"). `None` for an empty reference.
pub fn reference_answer(reference: &str) -> Option<Answer> {
    let trimmed = reference.trim();
    if let Some(found) = extract_answer(trimmed) {
        if matches!(found.source, AnswerSource::Boxed | AnswerSource::GsmHashes) {
            return Some(found.answer);
        }
    }
    match normalize(trimmed) {
        Answer::Text(t) if t.is_empty() => None,
        answer => Some(answer),
    }
}

/// Math answers: extracts the completion's final answer and compares it with the
/// reference's by [`equivalent`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MathVerifier;

impl Verifier for MathVerifier {
    fn verify(&self, completion: &str, reference: &str) -> Verdict {
        let Some(expected) = reference_answer(reference) else {
            return Verdict::wrong("reference has no answer");
        };
        let Some(found) = extract_answer(completion) else {
            return Verdict::wrong("no answer found in the completion");
        };
        if equivalent(&found.answer, &expected) {
            Verdict::correct()
        } else {
            Verdict::wrong(format!("expected {expected}, found {}", found.answer))
        }
    }
}

/// The trimmed completion must equal the trimmed reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactMatch {
    /// Compare after lowercasing both sides (Unicode lowercase).
    pub case_insensitive: bool,
}

impl ExactMatch {
    /// An `ExactMatch` that ignores case.
    pub fn case_insensitive() -> Self {
        ExactMatch {
            case_insensitive: true,
        }
    }
}

impl Verifier for ExactMatch {
    fn verify(&self, completion: &str, reference: &str) -> Verdict {
        let (got, want) = (completion.trim(), reference.trim());
        let same = if self.case_insensitive {
            got.to_lowercase() == want.to_lowercase()
        } else {
            got == want
        };
        if same {
            Verdict::correct()
        } else {
            Verdict::wrong("completion differs from the reference")
        }
    }
}

/// The completion must match a regular expression (anywhere; anchor it with `^…$` for
/// a full match). The reference is not used.
#[derive(Debug, Clone)]
pub struct RegexVerifier {
    regex: Regex,
}

impl RegexVerifier {
    /// Compiles `pattern` (Rust `regex` syntax); errors with
    /// [`VerifyError::InvalidRegex`] if it does not compile.
    pub fn new(pattern: &str) -> Result<Self, VerifyError> {
        let regex = Regex::new(pattern).map_err(|source| VerifyError::InvalidRegex {
            pattern: pattern.to_string(),
            source,
        })?;
        Ok(RegexVerifier { regex })
    }
}

impl Verifier for RegexVerifier {
    fn verify(&self, completion: &str, _reference: &str) -> Verdict {
        if self.regex.is_match(completion) {
            Verdict::correct()
        } else {
            Verdict::wrong(format!(
                "completion does not match /{}/",
                self.regex.as_str()
            ))
        }
    }
}

/// Multiple choice with letters A–J. The reference is a letter ("B", "(b)") or any text
/// a choice can be extracted from ("Answer: B").
#[derive(Debug, Clone, Copy, Default)]
pub struct ChoiceVerifier;

impl Verifier for ChoiceVerifier {
    fn verify(&self, completion: &str, reference: &str) -> Verdict {
        let expected = choice_letter(reference)
            .filter(|c| ('A'..='J').contains(c))
            .or_else(|| extract_choice(reference));
        let Some(expected) = expected else {
            return Verdict::wrong("reference is not a choice letter A-J");
        };
        match extract_choice(completion) {
            Some(found) if found == expected => Verdict::correct(),
            Some(found) => Verdict::wrong(format!("expected {expected}, found {found}")),
            None => Verdict::wrong("no choice letter found in the completion"),
        }
    }
}

/// The signature of a reward callback: (completion, reference) → reward.
pub type RewardFn = dyn Fn(&str, &str) -> f64 + Send + Sync;

/// Wraps a reward callback. Its result is clamped to [0, 1]; NaN, and a panic inside the
/// callback, give 0 with a reason.
pub struct FnVerifier {
    callback: Box<RewardFn>,
}

impl FnVerifier {
    /// Wraps a closure `(completion, reference) -> reward`.
    pub fn new(callback: impl Fn(&str, &str) -> f64 + Send + Sync + 'static) -> Self {
        FnVerifier {
            callback: Box::new(callback),
        }
    }

    /// Wraps an already boxed callback.
    pub fn from_box(callback: Box<RewardFn>) -> Self {
        FnVerifier { callback }
    }
}

impl fmt::Debug for FnVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnVerifier(..)")
    }
}

impl Verifier for FnVerifier {
    fn verify(&self, completion: &str, reference: &str) -> Verdict {
        // A reward callback is host code; its panic must not take the runtime down.
        let result = catch_unwind(AssertUnwindSafe(|| (self.callback)(completion, reference)));
        match result {
            Err(_) => Verdict::wrong("reward callback panicked"),
            Ok(r) if r.is_nan() => Verdict::wrong("reward callback returned NaN"),
            Ok(r) if !(0.0..=1.0).contains(&r) => Verdict {
                reward: r.clamp(0.0, 1.0),
                reason: Some(format!("reward {r} clamped to [0, 1]")),
            },
            Ok(r) => Verdict {
                reward: r,
                reason: None,
            },
        }
    }
}
