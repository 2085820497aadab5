//! The evaluation harness behind `verity eval`: read GSM8K-style JSONL, sample N traces
//! per question once, apply every selection rule to the same traces, and report accuracy
//! (with a 95% Wilson interval), tokens generated and wall time per rule. Sequential rules
//! (ESC, adaptive consistency) are simulated on those traces in sample order and charged
//! only the samples they would have drawn. Online rules run their own sampling on the same
//! questions, in the engine (ESC, adaptive consistency, DeepConf-online: samples drawn a
//! few at a time until the answer settles, a stopped sample's slot refilled at once), so
//! their tokens and wall time are measured, not simulated.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use verity::chat::ChatMessage;
use verity::engine::Request;
use verity::runtime::{GenerateRequest, Runtime, BASE_ADAPTER};
use verity::sampling::SamplingParams;
use verity::score::TraceScore;
use verity::select::{select, SelectionRule};
use verity::verify::{equivalent, reference_answer, Answer};
use verity::{Error, Result};

/// What the model is asked to do with each question.
pub const BOXED_INSTRUCTION: &str =
    " Please reason step by step, and put your final answer within \\boxed{}.";

#[derive(Debug, Clone, Serialize)]
pub struct EvalItem {
    pub question: String,
    pub answer: String,
}

/// Reads `{question, answer}` objects, one per line (field names configurable).
pub fn read_jsonl(path: &Path, question_field: &str, answer_field: &str) -> Result<Vec<EvalItem>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut items = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |what: &str| Error::InvalidArgument(format!("{}:{}: {what}", path.display(), n + 1));
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        // Numbers are fine as answers ("answer": 42); objects, lists, booleans and null
        // are a mistake in the file, not a question or an answer.
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(other) => Err(bad(&format!(
                    "field '{name}' must be a string or a number, not {other}"
                ))),
                None => Err(bad(&format!("no field '{name}'"))),
            }
        };
        items.push(EvalItem {
            question: field(question_field)?,
            answer: field(answer_field)?,
        });
    }
    Ok(items)
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub rules: Vec<SelectionRule>,
    /// Sequential rules run in the engine, each on its own samples.
    pub online: Vec<SelectionRule>,
    /// Samples of an online rule decoding at once (`None`: the rule's default).
    pub parallel: Option<usize>,
    /// Loaded adapter to decode with (None = the base model).
    pub adapter: Option<String>,
    /// Questions in flight at once (their requests share the engine's batches); 1 = one
    /// after another. Results do not depend on it: every question has its own seeds.
    pub concurrency: usize,
}

/// One rule's totals.
#[derive(Debug, Clone, Serialize)]
pub struct RuleResult {
    pub rule: String,
    /// Generated tokens per question the rule needed.
    pub mean_tokens: f64,
    pub wall: Duration,
    /// Whether the rule was right, per question in data order (for paired comparisons).
    pub outcomes: Vec<bool>,
}

/// Two rules compared on the same questions: `gained` questions only the first gets
/// right, `lost` only the second, and the exact two-sided sign-test (McNemar) p-value of
/// that split under "neither rule is better".
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Paired {
    pub gained: usize,
    pub lost: usize,
    pub p_value: f64,
}

impl RuleResult {
    pub(crate) fn new(rule: String, questions: usize) -> Self {
        RuleResult {
            rule,
            mean_tokens: 0.0,
            wall: Duration::ZERO,
            outcomes: vec![false; questions],
        }
    }
    /// One question's outcome; `mean_tokens` holds the sum until [`finish`](Self::finish).
    pub(crate) fn record(&mut self, question: usize, ok: bool, tokens: usize, wall: Duration) {
        self.outcomes[question] = ok;
        self.mean_tokens += tokens as f64;
        self.wall += wall;
    }
    /// Turns the token sum into the mean per question, once every question is recorded.
    pub(crate) fn finish(&mut self) {
        if self.total() > 0 {
            self.mean_tokens /= self.total() as f64;
        }
    }
    pub fn correct(&self) -> usize {
        self.outcomes.iter().filter(|&&ok| ok).count()
    }
    pub fn total(&self) -> usize {
        self.outcomes.len()
    }
    pub fn accuracy(&self) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            self.correct() as f64 / self.total() as f64
        }
    }
    /// 95% Wilson score interval.
    pub fn interval(&self) -> (f64, f64) {
        wilson(self.correct(), self.total())
    }
    /// This rule against `baseline`, question by question.
    pub fn paired(&self, baseline: &RuleResult) -> Paired {
        let (mut gained, mut lost) = (0, 0);
        for (&a, &b) in self.outcomes.iter().zip(&baseline.outcomes) {
            gained += (a && !b) as usize;
            lost += (!a && b) as usize;
        }
        Paired {
            gained,
            lost,
            p_value: sign_test(gained, lost),
        }
    }
}

/// Exact two-sided sign test: the probability, with a fair coin deciding each of the
/// a + b discordant questions, of a split at least as uneven as (a, b).
pub fn sign_test(a: usize, b: usize) -> f64 {
    let n = a + b;
    if n == 0 {
        return 1.0;
    }
    // Σ_{i ≤ min} C(n, i) / 2^n, in logs so that large n does not underflow.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_c = 0.0;
    let mut tail = 0.0;
    for i in 0..=a.min(b) {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_c + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

pub fn wilson(correct: usize, total: usize) -> (f64, f64) {
    if total == 0 {
        return (0.0, 1.0);
    }
    let (n, p, z) = (total as f64, correct as f64 / total as f64, 1.96f64);
    let center = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / (1.0 + z * z / n);
    ((center - half).max(0.0), (center + half).min(1.0))
}

fn is_correct(answer: &Option<Answer>, reference: &Option<Answer>) -> bool {
    matches!((answer, reference), (Some(a), Some(r)) if equivalent(a, r))
}

/// The request for `question`: the boxed-answer instruction in the chat template, the
/// config's sampling and adapter, `scores` computed on every trace. Its traces are not
/// remembered for feedback.
///
/// Questions are asked as chat turns: [`require_chat_template`] says so up front.
pub fn request(
    question: &str,
    n: usize,
    config: &EvalConfig,
    temperature: f32,
    seed: u64,
    scores: &[TraceScore],
) -> GenerateRequest {
    let mut r = Request::chat(vec![ChatMessage::user(format!(
        "{question}{BOXED_INSTRUCTION}"
    ))]);
    r.n = n;
    r.max_tokens = config.max_tokens;
    r.sampling = SamplingParams {
        temperature,
        top_p: config.top_p,
        seed,
        ..Default::default()
    };
    GenerateRequest {
        adapter: Some(
            config
                .adapter
                .clone()
                .unwrap_or_else(|| BASE_ADAPTER.to_string()),
        ),
        scores: scores.to_vec(),
        remember: false,
        ..GenerateRequest::new(r)
    }
}

/// What one question contributed: per rule (in `config.rules` order, then the online
/// rules) whether it was right, the tokens generated and the
/// wall time; and its output lines.
struct QuestionOutcome {
    question: usize,
    /// (rule index, correct, tokens, wall)
    rules: Vec<(usize, bool, usize, Duration)>,
    online: Vec<(bool, usize, Duration)>,
    lines: Vec<serde_json::Value>,
}

/// The scores every rule needs, plus the two the output always carries.
fn needed_scores(rules: &[SelectionRule]) -> Vec<TraceScore> {
    let mut scores: Vec<TraceScore> = rules
        .iter()
        .filter(|r| **r != SelectionRule::Greedy)
        .flat_map(|r| r.required_scores())
        .collect();
    scores.extend([TraceScore::MeanSelfCertainty, TraceScore::MeanLogprob]);
    scores.sort();
    scores.dedup();
    scores
}

/// Greedy, the sampled rules and the online rules on one question.
fn evaluate_question(
    runtime: &Runtime,
    qi: usize,
    item: &EvalItem,
    config: &EvalConfig,
    scores: &[TraceScore],
) -> Result<QuestionOutcome> {
    let reference = reference_answer(&item.answer);
    let seed = config.seed.wrapping_add((qi as u64) << 20);
    let mut outcome = QuestionOutcome {
        question: qi,
        rules: Vec::new(),
        online: Vec::new(),
        lines: vec![
            serde_json::json!({"question": qi, "kind": "question", "text": item.question, "reference": item.answer}),
        ],
    };
    // The n samples at the configured temperature (the online rules' samples are the
    // same traces as far as they go: sample i has seed + i in both).
    let sampled = || {
        request(
            &item.question,
            config.n,
            config,
            config.temperature,
            seed,
            scores,
        )
    };
    if config.rules.contains(&SelectionRule::Greedy) {
        let start = Instant::now();
        let result = runtime.generate(request(&item.question, 1, config, 0.0, seed, scores))?;
        let wall = start.elapsed();
        let (trace, c) = (&result.traces[0].trace, &result.candidates()[0]);
        let ok = is_correct(&c.answer, &reference);
        for (ri, rule) in config.rules.iter().enumerate() {
            if *rule == SelectionRule::Greedy {
                outcome.rules.push((ri, ok, trace.tokens.len(), wall));
            }
        }
        let answer = c.answer.as_ref().map(|a| a.to_string());
        outcome.lines.push(serde_json::json!({"question": qi, "kind": "greedy", "text": trace.text, "tokens": trace.tokens.len(), "answer": answer, "correct": ok}));
        outcome.lines.push(serde_json::json!({"question": qi, "kind": "rule", "rule": SelectionRule::Greedy.to_string(), "answer": answer, "correct": ok, "tokens": trace.tokens.len()}));
    }
    if config.rules.iter().any(|r| *r != SelectionRule::Greedy) {
        let start = Instant::now();
        let result = runtime.generate(sampled())?;
        let wall = start.elapsed();
        let cands = result.candidates();
        let lengths: Vec<usize> = result.traces.iter().map(|t| t.trace.tokens.len()).collect();
        for (ri, rule) in config.rules.iter().enumerate() {
            if *rule != SelectionRule::Greedy {
                // Sequential rules (ESC, adaptive) are simulated on the traces in sample
                // order: they are charged only the samples they would have drawn.
                let selection = select(rule, cands);
                let ok = is_correct(&selection.answer, &reference);
                let tokens = lengths[..selection.used].iter().sum();
                outcome.rules.push((ri, ok, tokens, wall));
                outcome.lines.push(serde_json::json!({"question": qi, "kind": "rule", "rule": rule.to_string(), "answer": selection.answer.map(|a| a.to_string()), "correct": ok, "tokens": tokens, "samples": selection.used}));
            }
        }
        for (t, c) in result.traces.iter().map(|t| &t.trace).zip(cands) {
            let s: serde_json::Map<String, serde_json::Value> = c
                .scores
                .iter()
                .map(|(k, v)| (k.to_string(), (*v).into()))
                .collect();
            outcome.lines.push(serde_json::json!({"question": qi, "kind": "sample", "index": t.index, "text": t.text, "tokens": t.tokens.len(), "finish": t.finish, "answer": c.answer.as_ref().map(|a| a.to_string()), "correct": is_correct(&c.answer, &reference), "scores": s, "token_stats": crate::rescore::TokenColumns::from_stats(&t.stats), "token_end": t.token_end}));
        }
    }
    for rule in &config.online {
        let start = Instant::now();
        let mut r = sampled();
        r.selection = Some(*rule);
        r.parallel = config.parallel;
        let result = runtime.generate(r)?;
        let wall = start.elapsed();
        let answer = select(rule, result.candidates()).answer;
        let ok = is_correct(&answer, &reference);
        // Every token decoded counts, those of samples cut when the answer settled too.
        let tokens = result.generated_tokens();
        outcome.online.push((ok, tokens, wall));
        outcome.lines.push(serde_json::json!({"question": qi, "kind": "online", "rule": rule.to_string(), "answer": answer.map(|a| a.to_string()), "correct": ok, "tokens": tokens, "settled_after": result.settled_after, "samples_started": result.traces.len()}));
    }
    Ok(outcome)
}

/// Runs the evaluation; `progress(done, total)` is called after each question and every
/// trace is written to `out` (JSONL) when given. `config.concurrency` questions are in
/// flight at once; a rule's wall time is the sum of its questions' latencies.
/// Every question is asked as a chat turn: a model without a chat template is an error
/// named before anything is run or written.
pub fn require_chat_template(runtime: &Runtime, what: &str) -> Result<()> {
    if runtime.model().tokenizer.chat_template().is_none() {
        return Err(Error::InvalidArgument(format!(
            "{what} asks each question as a chat turn, and {} has no chat template (nothing \
             was written)",
            runtime.model().path.display()
        )));
    }
    Ok(())
}

pub fn run(
    runtime: &Runtime,
    items: &[EvalItem],
    config: &EvalConfig,
    mut progress: impl FnMut(usize, usize),
    mut out: Option<&mut dyn Write>,
) -> Result<Vec<RuleResult>> {
    let scores = needed_scores(&config.rules);
    let mut results: Vec<RuleResult> = config
        .rules
        .iter()
        .map(|r| RuleResult::new(r.to_string(), items.len()))
        .collect();
    let mut online_results: Vec<RuleResult> = config
        .online
        .iter()
        .map(|r| RuleResult::new(format!("online {r}"), items.len()))
        .collect();
    let write_err =
        |e: std::io::Error| Error::InvalidArgument(format!("cannot write the output: {e}"));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let workers = config.concurrency.clamp(1, items.len().max(1));
    // The first question takes a while to finish: show the bar from the start.
    progress(0, items.len());
    let (send, receive) = std::sync::mpsc::channel::<Result<QuestionOutcome>>();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..workers {
            let send = send.clone();
            let (next, failed, scores) = (&next, &failed, &scores);
            scope.spawn(move || loop {
                let qi = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if qi >= items.len() || failed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let outcome = evaluate_question(runtime, qi, &items[qi], config, scores);
                if send.send(outcome).is_err() {
                    break;
                }
            });
        }
        drop(send);
        for (done, outcome) in receive.iter().enumerate() {
            // On an error the workers stop taking questions; the error is returned once
            // the ones in flight have finished.
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
            };
            for (ri, ok, tokens, wall) in outcome.rules {
                results[ri].record(outcome.question, ok, tokens, wall);
            }
            for ((ok, tokens, wall), res) in outcome.online.into_iter().zip(&mut online_results) {
                res.record(outcome.question, ok, tokens, wall);
            }
            if let Some(out) = out.as_deref_mut() {
                for line in outcome.lines {
                    writeln!(out, "{line}").map_err(write_err)?;
                }
                // A run stopped midway keeps every question that finished.
                out.flush().map_err(write_err)?;
            }
            progress(done + 1, items.len());
        }
        Ok(())
    })?;
    results.extend(online_results);
    results.iter_mut().for_each(RuleResult::finish);
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcomes: &[bool]) -> RuleResult {
        let mut r = RuleResult::new(String::new(), outcomes.len());
        for (q, &ok) in outcomes.iter().enumerate() {
            r.record(q, ok, 0, Duration::ZERO);
        }
        r
    }

    #[test]
    fn sign_test_matches_the_binomial_tails() {
        // 2 · Σ_{i ≤ k} C(n, i) / 2^n, by hand.
        assert_eq!(sign_test(0, 0), 1.0);
        assert_eq!(sign_test(5, 5), 1.0);
        assert!((sign_test(6, 0) - 2.0 / 64.0).abs() < 1e-15);
        assert!((sign_test(2, 8) - 2.0 * 56.0 / 1024.0).abs() < 1e-15);
        assert!((sign_test(8, 2) - sign_test(2, 8)).abs() < 1e-15);
        // 15 vs 5: C(20, 0..=5) = 1 + 20 + 190 + 1140 + 4845 + 15504 = 21700.
        assert!((sign_test(15, 5) - 2.0 * 21700.0 / 1048576.0).abs() < 1e-14);
        // Large n stays finite and tiny instead of underflowing to a wrong 0 or NaN.
        let p = sign_test(900, 100);
        assert!(p > 0.0 && p < 1e-100, "{p}");
    }

    #[test]
    fn data_rows_take_strings_and_numbers_only() {
        let dir = std::env::temp_dir().join(format!("verity-eval-rows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rows.jsonl");
        std::fs::write(
            &path,
            "{\"question\": \"1 + 1?\", \"answer\": 2}\n\n{\"question\": \"q\", \"answer\": \"#### 3\"}\n",
        )
        .unwrap();
        let items = read_jsonl(&path, "question", "answer").unwrap();
        let got: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.question.as_str(), i.answer.as_str()))
            .collect();
        assert_eq!(got, vec![("1 + 1?", "2"), ("q", "#### 3")]);
        for (row, says) in [
            (
                "{\"question\": [\"x\"], \"answer\": 1}",
                "'question' must be",
            ),
            (
                "{\"question\": \"x\", \"answer\": null}",
                "'answer' must be",
            ),
            (
                "{\"question\": \"x\", \"answer\": {\"v\": 1}}",
                "'answer' must be",
            ),
            ("{\"question\": \"x\"}", "no field 'answer'"),
        ] {
            std::fs::write(
                &path,
                format!("{{\"question\": \"ok\", \"answer\": 1}}\n{row}\n"),
            )
            .unwrap();
            let e = read_jsonl(&path, "question", "answer")
                .unwrap_err()
                .to_string();
            assert!(e.contains(says) && e.contains(":2:"), "{row}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paired_counts_the_discordant_questions() {
        let a = result(&[true, true, false, true, false, true]);
        let b = result(&[true, false, false, false, true, false]);
        let d = a.paired(&b);
        assert_eq!((d.gained, d.lost), (3, 1));
        assert!((d.p_value - 2.0 * 5.0 / 16.0).abs() < 1e-15);
        let back = b.paired(&a);
        assert_eq!((back.gained, back.lost), (1, 3));
    }
}
