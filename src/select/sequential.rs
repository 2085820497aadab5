//! The stopping tests of the sequential rules: early-stopping self-consistency (a unanimous
//! window) and adaptive consistency (the Beta posterior that the leading answer stays the
//! leader), and the test both add: the vote is decided (the samples left cannot change
//! the leader). All look only at the extracted answers, so they work where confidence
//! scores are unreliable.

use super::{majority, Candidate};
use crate::verify::equivalent;

/// ESC: the drawn candidates end on a full window of `window` whose answers are all
/// present and equivalent.
pub(super) fn esc_settled(drawn: &[Candidate], window: usize) -> bool {
    let k = drawn.len();
    if window == 0 || k < window || !k.is_multiple_of(window) {
        return false;
    }
    let last = &drawn[k - window..];
    let Some(first) = &last[0].answer else {
        return false;
    };
    last.iter()
        .all(|c| c.answer.as_ref().is_some_and(|a| equivalent(first, a)))
}

/// The vote counts of the leading answer and the runner-up (0 when there is none) among
/// `drawn`; `None` when no candidate has an answer (those without one do not vote).
fn top_two(drawn: &[Candidate]) -> Option<(usize, usize)> {
    let votes = majority(drawn).votes;
    let leader = votes.first()?.count;
    Some((leader, votes.get(1).map_or(0, |row| row.count)))
}

/// Whether the majority of all `budget` candidates is already known from the `drawn` ones:
/// the leading answer is ahead of the runner-up by more than the candidates left to draw,
/// so even if every one of them went to the runner-up the leader would stay ahead. (A
/// sequential rule's answer is the majority of what it drew, and that leader leads every
/// longer prefix too, so stopping here changes no answer; it only saves samples.)
pub(super) fn decided(drawn: &[Candidate], budget: usize) -> bool {
    top_two(drawn)
        .is_some_and(|(leader, runner_up)| leader - runner_up > budget.saturating_sub(drawn.len()))
}

/// Adaptive consistency: the leading answer's votes v₁ and the runner-up's v₂ give
/// [`leader_stays_ahead`]`(v₁, v₂) ≥ threshold`.
pub(super) fn adaptive_settled(drawn: &[Candidate], threshold: f64) -> bool {
    top_two(drawn)
        .is_some_and(|(leader, runner_up)| leader_stays_ahead(leader, runner_up) >= threshold)
}

/// The Beta stopping rule of adaptive consistency: with v₁ votes for the leading answer and
/// v₂ for the runner-up, P(p₁ > p₂) where p₁ ~ Beta(v₁ + 1, v₂ + 1), i.e. 1 − I½(v₁ + 1,
/// v₂ + 1). For whole counts that is P(Binomial(v₁ + v₂ + 1, ½) ≤ v₁), summed exactly here
/// (in logs, so large counts do not underflow).
pub fn leader_stays_ahead(leader: usize, runner_up: usize) -> f64 {
    let n = leader + runner_up + 1;
    let ln_half_n = n as f64 * 0.5f64.ln();
    // Σ_{i ≤ v₁} C(n, i) / 2ⁿ; the complement is shorter when v₁ is past the middle.
    let lower_tail = |upto: usize| {
        let mut ln_c = 0.0;
        let mut sum = 0.0;
        for i in 0..=upto {
            if i > 0 {
                ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
            }
            sum += (ln_c + ln_half_n).exp();
        }
        sum
    };
    if 2 * leader < n {
        lower_tail(leader)
    } else {
        // P(B ≤ v₁) = 1 − P(B ≥ v₁ + 1) = 1 − P(B ≤ n − v₁ − 1) by symmetry.
        1.0 - lower_tail(n - leader - 1)
    }
    .clamp(0.0, 1.0)
}
