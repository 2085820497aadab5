//! Answer extraction, answer equivalence and verifiers.
//!
//! [`extract_answer`] finds the final answer in a completion, [`normalize`] turns answer
//! text into a comparable [`Answer`], [`equivalent`] compares two answers, and the
//! [`Verifier`] implementations turn (completion, reference) into a reward in [0, 1].

mod answer;
mod extract;
mod verifiers;

#[cfg(test)]
mod tests;

pub use answer::{equivalent, normalize, Answer};
pub use extract::{extract_answer, extract_choice, numbers_in, AnswerSource, Extracted};
pub use verifiers::{
    reference_answer, ChoiceVerifier, ExactMatch, FnVerifier, MathVerifier, RegexVerifier,
    RewardFn, Verdict, Verifier, VerifyError,
};
