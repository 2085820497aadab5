//! Tests for answer extraction, normalisation, equivalence and the verifiers.

use super::*;

/// The answer a table case expects.
#[derive(Debug, Clone, Copy)]
enum Exp {
    N(f64),
    T(&'static str),
}
use Exp::{N, T};

fn matches_expectation(found: &Answer, expected: Exp) -> bool {
    match expected {
        N(x) => equivalent(found, &Answer::Number(x)),
        T(t) => found == &Answer::Text(t.to_string()),
    }
}

/// (completion text, expected final answer).
const EXTRACTION_CASES: &[(&str, Option<Exp>)] = &[
    // \boxed{…} and \fbox{…}
    (r"The result is \boxed{42}.", Some(N(42.0))),
    (r"\boxed{\frac{1}{2}}", Some(N(0.5))),
    (r"\boxed{{3}}", Some(N(3.0))),
    (r"\boxed{ 7 }", Some(N(7.0))),
    (r"First \boxed{3}, then corrected: \boxed{5}", Some(N(5.0))),
    (r"\boxed{-4}", Some(N(-4.0))),
    (r"\boxed{\dfrac{3}{4}}", Some(N(0.75))),
    (r"\boxed{\tfrac{1}{4}}", Some(N(0.25))),
    (r"\boxed{1,234}", Some(N(1234.0))),
    (r"\boxed{\$18}", Some(N(18.0))),
    (r"\boxed{18\text{ dollars}}", Some(N(18.0))),
    (r"\boxed{50\%}", Some(N(50.0))),
    (r"\boxed{90^\circ}", Some(N(90.0))),
    (r"\boxed{90^{\circ}}", Some(N(90.0))),
    (r"\boxed{x = 5}", Some(N(5.0))),
    (r"\boxed{\text{B}}", Some(T("B"))),
    (r"\fbox{12}", Some(N(12.0))),
    (r"\boxed {8}", Some(N(8.0))),
    (r"So we get $\boxed{2.5}$.", Some(N(2.5))),
    (r"\boxed{-\frac{2}{3}}", Some(N(-2.0 / 3.0))),
    (r"\boxed{\frac{-2}{3}}", Some(N(-2.0 / 3.0))),
    (r"\boxed{\left(3\right)}", Some(N(3.0))),
    (r"\boxed{\sqrt{2}}", Some(T(r"\sqrt{2}"))),
    (r"\boxed{} The answer is 4.", Some(N(4.0))),
    (r"\boxed{3 and so on", Some(N(3.0))),
    (r"\boxed{5} but wait \boxed{6", Some(N(5.0))),
    (r"\boxed{\boxed{7}}", Some(N(7.0))),
    (r"\boxed{\frac12}", Some(N(0.5))),
    (r"\boxed{1{,}000}", Some(N(1000.0))),
    (r"\boxed{3\,000}", Some(N(3000.0))),
    (r"\boxed{\text{Paris}}", Some(T("paris"))),
    ("\\boxed{\u{2212}3}", Some(N(-3.0))),
    (r"\boxed{0.5}", Some(N(0.5))),
    (r"\boxed{.5}", Some(N(0.5))),
    (r"\boxed{A}", Some(T("A"))),
    (r"\boxed{(C)}", Some(T("C"))),
    (r"\boxed{12 \text{ cm}^2}", Some(N(12.0))),
    (r"\boxed{€20}", Some(N(20.0))),
    (r"\boxed{\frac{3}{0}}", Some(T(r"\frac{3}{0}"))),
    (r"It is \boxed{10} apples, or \boxed{11}?", Some(N(11.0))),
    (r"\boxed{\{1,2\}}", Some(T(r"\{1,2\}"))),
    (r"\boxed{\displaystyle \frac{5}{2}}", Some(N(2.5))),
    (r"\boxed{(-5)}", Some(N(-5.0))),
    (r"\boxed{+6}", Some(N(6.0))),
    (r"\boxed{3.}", Some(N(3.0))),
    // GSM8K "#### x"
    ("Janet sells 9 eggs.\n#### 18", Some(N(18.0))),
    ("#### 1,234", Some(N(1234.0))),
    ("#### $18", Some(N(18.0))),
    ("#### -5", Some(N(-5.0))),
    ("#### 72\n", Some(N(72.0))),
    ("Some work 3 + 4 = 7\n#### 7", Some(N(7.0))),
    ("##### 9", Some(N(9.0))),
    ("#### Step 1\nWe add 2 and 3 to get 5", Some(N(5.0))),
    ("#### olleh", Some(T("olleh"))),
    ("#### 3, 5, 9", Some(T("3,5,9"))),
    ("#### 0.25", Some(N(0.25))),
    ("####", None),
    ("#### \n10 apples", Some(N(10.0))),
    ("#### 18 dollars", Some(N(18.0))),
    ("#### 12.50", Some(N(12.5))),
    ("The answer is 4.\n#### 5", Some(N(5.0))),
    ("#### 1,000,000", Some(N(1_000_000.0))),
    // "the answer is x", "final answer: x"
    ("The answer is 42.", Some(N(42.0))),
    ("The answer is $18.", Some(N(18.0))),
    ("So the final answer is 7", Some(N(7.0))),
    ("Final answer: 3/4", Some(N(0.75))),
    ("final ANSWER: -12", Some(N(-12.0))),
    ("The answer is: 1,000.", Some(N(1000.0))),
    ("The answer is 3.5 meters.", Some(N(3.5))),
    (
        "The answer is 42. Let me double-check: 6*7=42, and 5 > 3.",
        Some(N(42.0)),
    ),
    ("Thus the answer is 5, since 2+3=5.", Some(N(5.0))),
    ("The answer is 50%.", Some(N(50.0))),
    ("The answer is €30", Some(N(30.0))),
    ("The answer is £1,500.00.", Some(N(1500.0))),
    ("The answer is ¥500", Some(N(500.0))),
    ("The answer is x = 4.", Some(N(4.0))),
    ("The answer is Paris.", Some(T("paris"))),
    ("The answer is (B).", Some(T("B"))),
    ("The answer is 7!", Some(N(7.0))),
    ("THE ANSWER IS 9", Some(N(9.0))),
    ("The answer is 2. No wait, the answer is 3.", Some(N(3.0))),
    (
        "Final Answer: The final answer is $12$. I hope it is correct.",
        Some(N(12.0)),
    ),
    (r"The answer is \frac{1}{2}", Some(N(0.5))),
    (r"The answer is $\frac{3}{2}$.", Some(N(1.5))),
    ("The answer is \u{2212}7", Some(N(-7.0))),
    ("The answer is **15**", Some(N(15.0))),
    ("The answer is", None),
    ("The answer is 12 apples", Some(N(12.0))),
    ("The answer is 5 km", Some(N(5.0))),
    ("My answer is 0", Some(N(0.0))),
    ("The final answer is 1/3.", Some(N(1.0 / 3.0))),
    ("The answer is 3, 5, 9.", Some(T("3,5,9"))),
    (
        "answer is: 64\nExplanation: 8 squared is 64 and 2 cubed is 8",
        Some(N(64.0)),
    ),
    ("The answer is -0.5.", Some(N(-0.5))),
    (
        "The answer is 5.\n\nWait, let me reconsider... 7",
        Some(N(5.0)),
    ),
    ("Answer is 0.75", Some(N(0.75))),
    (r"The answer is \$2,500.", Some(N(2500.0))),
    ("The answer is. Actually 8", Some(N(8.0))),
    // multiple-choice letters
    ("Answer: (B)", Some(T("B"))),
    ("Answer: C", Some(T("C"))),
    ("**Answer:** D", Some(T("D"))),
    ("The correct option is E.", Some(T("E"))),
    ("I pick choice (a).", Some(T("A"))),
    ("Answer: A total of 5 apples", Some(N(5.0))),
    ("answer: [J]", Some(T("J"))),
    ("Answer: B\nBecause the graph rises 2 units", Some(T("B"))),
    ("Option K", None),
    ("Answer: G, since the rest fail", Some(T("G"))),
    // the last number
    ("I think it's 15 or maybe 16", Some(N(16.0))),
    ("Total: 1,234,567 items", Some(N(1_234_567.0))),
    ("She has -3 dollars", Some(N(-3.0))),
    ("Between 5-3 options", Some(N(3.0))),
    ("The ratio is 3/4", Some(N(0.75))),
    ("The length is about 2.75 m", Some(N(2.75))),
    ("no digits here", None),
    ("", None),
    ("   \n\t ", None),
    ("temperature dropped to \u{2212}5 degrees", Some(N(-5.0))),
    ("It costs 12.50.", Some(N(12.5))),
    ("🙂 5 é", Some(N(5.0))),
    ("x2 + y3", Some(N(3.0))),
    ("}}}{{{", None),
    (r"\boxed{", None),
    (r"\boxed{{1}", Some(N(1.0))),
    ("2023-01-05 meeting", Some(N(5.0))),
    ("12 + 30 = 42", Some(N(42.0))),
    ("The value is 007", Some(N(7.0))),
    ("It is 5%.", Some(N(5.0))),
    ("Bought 3 apples at $0.50 each", Some(N(0.5))),
    ("é🙂−", None),
    ("The total is 100 dollars", Some(N(100.0))),
    ("The answer is 42 because 6*7 is 42.", Some(N(42.0))),
    (r"$x = \frac{7}{2}$", Some(N(3.5))),
    (r"so y is -\dfrac{3}{4}", Some(N(-0.75))),
    ("She needs 20 more.\n#### Final Answer\n20", Some(N(20.0))),
    // a reasoning model's thinking is not its answer
    (
        "<think>maybe \\boxed{3}? no, 4</think>The answer is \\boxed{4}.",
        Some(N(4.0)),
    ),
    ("<think>2 + 2 = 4</think>\n\nSo it is 5.", Some(N(5.0))),
    ("<think>I guess \\boxed{7}</think>\n\nI am not sure.", None),
    ("<think>first 9, then 12, still working", None),
    ("reasoning...</think>\\boxed{6}", Some(N(6.0))),
    ("<think>a</think>x<think>b</think>It is 8", Some(N(8.0))),
];

#[test]
fn extraction_table() {
    assert!(EXTRACTION_CASES.len() >= 110, "{}", EXTRACTION_CASES.len());
    let mut failures = Vec::new();
    for &(text, expected) in EXTRACTION_CASES {
        let found = extract_answer(text);
        let ok = match (&found, expected) {
            (None, None) => true,
            (Some(f), Some(e)) => matches_expectation(&f.answer, e),
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{text:?}: expected {expected:?}, got {:?}",
                found.map(|f| (f.raw, f.answer, f.source))
            ));
        }
        if let Some(f) = extract_answer(text) {
            assert_eq!(&text[f.span.clone()], f.raw, "{text:?}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn extraction_reports_source_and_span() {
    let cases: &[(&str, AnswerSource, &str)] = &[
        (
            r"so \boxed{\frac{1}{2}} done",
            AnswerSource::Boxed,
            r"\frac{1}{2}",
        ),
        ("work\n#### 1,234", AnswerSource::GsmHashes, "1,234"),
        ("The answer is $18.", AnswerSource::AnswerIs, "$18"),
        ("Answer: (B)", AnswerSource::Choice, "B"),
        ("it is 3 or 4 apples", AnswerSource::LastNumber, "4"),
        ("down by \u{2212}2", AnswerSource::LastNumber, "\u{2212}2"),
        (
            "<think>\\boxed{1}</think>so \\boxed{2}",
            AnswerSource::Boxed,
            "2",
        ),
    ];
    for &(text, source, raw) in cases {
        let found = extract_answer(text).expect(text);
        assert_eq!(found.source, source, "{text:?}");
        assert_eq!(found.raw, raw, "{text:?}");
        assert_eq!(&text[found.span], raw, "{text:?}");
    }
}

/// (a, b, equivalent after normalisation?)
const EQUIVALENCE_CASES: &[(&str, &str, bool)] = &[
    ("0.5", "1/2", true),
    ("0.5", r"\frac{1}{2}", true),
    ("1/2", r"\dfrac{1}{2}", true),
    (r"\frac{1}{2}", r"\tfrac12", true),
    ("18", "18.00", true),
    ("18", "$18", true),
    ("18.00", r"\$18", true),
    ("1,000", "1000", true),
    ("50%", "50", true),
    ("50%", "0.5", false),
    ("1/3", "0.3333333", true),
    ("1/3", "0.33", false),
    ("-0.5", r"-\frac{1}{2}", true),
    ("\u{2212}2", "-2", true),
    ("B", "(b)", true),
    ("Paris", "paris.", true),
    ("5", "B", false),
    ("0", "0.0000000001", true),
    ("0", "0.001", false),
    ("1000000", "1000000.5", true),
    ("100", "101", false),
    ("x = 3", "3", true),
    ("3 apples", "3", true),
    ("3,5,9", "3, 5, 9", true),
    (r"\text{yes}", "Yes", true),
    ("€5", "5 euros", true),
    (r"\left(7\right)", "7", true),
    ("New  York", "new york", true),
    ("12", "12 cm^2", true),
    ("apple", "apples", false),
];

#[test]
fn equivalence_table() {
    for &(a, b, expected) in EQUIVALENCE_CASES {
        let (na, nb) = (normalize(a), normalize(b));
        assert_eq!(
            equivalent(&na, &nb),
            expected,
            "{a:?} ~ {b:?}: {na:?} vs {nb:?}"
        );
        assert_eq!(equivalent(&nb, &na), expected, "symmetry {a:?} {b:?}");
    }
}

#[test]
fn number_never_equals_text() {
    let number = Answer::Number(18.0);
    let text = Answer::Text("18".to_string());
    assert!(!equivalent(&number, &text));
    assert!(!equivalent(&text, &number));
}

#[test]
fn normalize_examples() {
    assert_eq!(normalize("1,234,567"), Answer::Number(1_234_567.0));
    assert_eq!(normalize("$1,234.50."), Answer::Number(1234.5));
    assert_eq!(
        normalize("  Hello,   World!  "),
        Answer::Text("hello,world".into())
    );
    assert_eq!(normalize("(c)"), Answer::Text("C".into()));
    assert_eq!(normalize("1/0"), Answer::Text("1/0".into()));
    assert_eq!(normalize(""), Answer::Text(String::new()));
    // Overflowing digits do not become infinity.
    assert!(matches!(normalize(&"9".repeat(400)), Answer::Text(_)));
}

#[test]
fn answer_display() {
    assert_eq!(Answer::Number(18.0).to_string(), "18");
    assert_eq!(Answer::Number(-0.5).to_string(), "-0.5");
    assert_eq!(Answer::Text("B".into()).to_string(), "B");
}

// ---- verifiers ----

#[test]
fn math_verifier_gsm8k_reference() {
    let reference = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18";
    let v = MathVerifier;
    assert_eq!(v.verify("So she makes $18.00.", reference).reward, 1.0);
    assert_eq!(v.verify(r"\boxed{18}", reference).reward, 1.0);
    let wrong = v.verify("The answer is 17.", reference);
    assert_eq!(wrong.reward, 0.0);
    assert_eq!(wrong.reason.as_deref(), Some("expected 18, found 17"));
}

#[test]
fn math_verifier_bare_references() {
    let v = MathVerifier;
    assert_eq!(v.verify(r"\boxed{0.5}", r"\frac{1}{2}").reward, 1.0);
    assert_eq!(v.verify("The answer is 1/2.", "0.5").reward, 1.0);
    assert_eq!(v.verify("#### 1,000", "1000").reward, 1.0);
    assert_eq!(v.verify("The answer is Paris.", "paris").reward, 1.0);
    assert_eq!(v.verify("The answer is 72", r"\boxed{72}").reward, 1.0);
    let none = v.verify("I do not know", "5");
    assert_eq!(none.reward, 0.0);
    assert!(none.reason.is_some());
    let empty_reference = v.verify("#### 5", "   ");
    assert_eq!(empty_reference.reward, 0.0);
    assert_eq!(
        empty_reference.reason.as_deref(),
        Some("reference has no answer")
    );
}

#[test]
fn exact_match() {
    let plain = ExactMatch::default();
    assert_eq!(plain.verify("  Yes \n", "Yes").reward, 1.0);
    assert_eq!(plain.verify("yes", "Yes").reward, 0.0);
    assert_eq!(
        ExactMatch::case_insensitive().verify("yes", "YES").reward,
        1.0
    );
    assert_eq!(
        ExactMatch::case_insensitive().verify("yes", "no").reward,
        0.0
    );
}

#[test]
fn regex_verifier() {
    let v = RegexVerifier::new(r"^\d+$").expect("valid pattern");
    assert_eq!(v.verify("123", "").reward, 1.0);
    assert_eq!(v.verify("12a", "").reward, 0.0);
    let err = RegexVerifier::new("(unclosed").expect_err("invalid pattern");
    let message = err.to_string();
    assert!(message.contains("(unclosed"), "{message}");
    assert!(message.starts_with("invalid regex"), "{message}");
}

#[test]
fn choice_verifier() {
    let v = ChoiceVerifier;
    assert_eq!(v.verify("Answer: B", "(b)").reward, 1.0);
    assert_eq!(v.verify("The answer is (C) 12", "C").reward, 1.0);
    assert_eq!(v.verify(r"\boxed{D}", "D").reward, 1.0);
    assert_eq!(v.verify("I choose option (j).", "J").reward, 1.0);
    assert_eq!(v.verify("Answer: D", "B").reward, 0.0);
    assert_eq!(v.verify("42", "B").reward, 0.0);
    let bad_reference = v.verify("Answer: B", "Z");
    assert_eq!(bad_reference.reward, 0.0);
    assert_eq!(
        bad_reference.reason.as_deref(),
        Some("reference is not a choice letter A-J")
    );
}

#[test]
fn fn_verifier_clamps_and_guards() {
    let v = FnVerifier::new(|c, r| if c == r { 0.5 } else { 2.0 });
    assert_eq!(
        v.verify("a", "a"),
        Verdict {
            reward: 0.5,
            reason: None
        }
    );
    let clamped = v.verify("a", "b");
    assert_eq!(clamped.reward, 1.0);
    assert!(clamped.reason.is_some());
    let negative = FnVerifier::new(|_, _| -3.0).verify("", "");
    assert_eq!(negative.reward, 0.0);
    let nan = FnVerifier::new(|_, _| f64::NAN).verify("", "");
    assert_eq!(nan.reward, 0.0);
    assert_eq!(nan.reason.as_deref(), Some("reward callback returned NaN"));
    let panics = FnVerifier::new(|_, _| panic!("host bug")).verify("", "");
    assert_eq!(panics.reward, 0.0);
    assert_eq!(panics.reason.as_deref(), Some("reward callback panicked"));
}

#[test]
fn verifiers_are_object_safe() {
    let cases: Vec<(Box<dyn Verifier>, &str, &str)> = vec![
        (Box::new(MathVerifier), "#### 7", "7"),
        (Box::new(ExactMatch::default()), "B", "B"),
        (Box::new(ChoiceVerifier), "Answer: B", "B"),
    ];
    for (verifier, completion, reference) in &cases {
        assert_eq!(verifier.verify(completion, reference).reward, 1.0);
    }
}

#[test]
fn nested_and_repeated_wrappers() {
    assert_eq!(normalize(r"\text{a \text{b}}"), Answer::Text("a b".into()));
    assert_eq!(normalize(r"\text{ 5 \text{apples"), Answer::Number(5.0));
    assert_eq!(normalize("{ { 4 } }"), Answer::Number(4.0));
    assert_eq!(normalize("{ }"), Answer::Text(String::new()));
}

/// Long adversarial inputs: each of these would take minutes if a scan were quadratic.
#[test]
fn pathological_inputs_stay_linear() {
    let n = 50_000;
    for text in [
        "\\boxed{".repeat(n),
        "\\text{".repeat(n),
        format!("the answer is {}", "$".repeat(n)),
        format!("{}{}", "{".repeat(n), "}".repeat(n)),
        "####\n".repeat(n),
        "1,".repeat(n),
    ] {
        let _ = extract_answer(&text);
        let _ = normalize(&text);
        let _ = MathVerifier.verify(&text, &text);
    }
}

// ---- property test ----

/// xorshift64*: a tiny deterministic generator for the property test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "a",
    "b",
    "Z",
    " ",
    "\n",
    "\t",
    "\\boxed{",
    "\\fbox{",
    "\\boxed",
    "{",
    "}",
    "#",
    "####",
    "$",
    "\\$",
    "\\frac{",
    "\\frac",
    "\\text{",
    "\\left(",
    "\\right)",
    "1",
    "2",
    "9",
    "0",
    ",",
    ".",
    "-",
    "/",
    "%",
    "^\\circ",
    "é",
    "🙂",
    "\u{2212}",
    "€",
    "*",
    "(",
    ")",
    "[",
    "]",
    ";",
    "!",
    "the answer is ",
    "Final Answer: ",
    "Answer: ",
    "(B)",
    "option ",
    "x = ",
    " dollars",
    "\\",
    "=",
    "1,234",
    "3.5",
    ":",
];

fn random_text(rng: &mut XorShift) -> String {
    let pieces = rng.below(40);
    (0..pieces)
        .map(|_| PIECES[rng.below(PIECES.len())])
        .collect()
}

#[test]
fn random_text_never_panics_and_spans_are_sound() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let regex_verifier = RegexVerifier::new(r"\d+").expect("valid pattern");
    let verifiers: Vec<Box<dyn Verifier>> = vec![
        Box::new(MathVerifier),
        Box::new(ExactMatch::default()),
        Box::new(ExactMatch::case_insensitive()),
        Box::new(regex_verifier),
        Box::new(ChoiceVerifier),
        Box::new(FnVerifier::new(|c, r| c.len() as f64 - r.len() as f64)),
    ];
    for _ in 0..20_000 {
        let text = random_text(&mut rng);
        let other = random_text(&mut rng);
        if let Some(found) = extract_answer(&text) {
            let span = found.span.clone();
            assert!(span.start < span.end && span.end <= text.len(), "{text:?}");
            assert!(text.is_char_boundary(span.start), "{text:?}");
            assert!(text.is_char_boundary(span.end), "{text:?}");
            assert!(text[span].contains(found.raw.as_str()), "{text:?}");
            assert!(equivalent(&found.answer, &found.answer), "{text:?}");
            assert!(!matches!(&found.answer, Answer::Text(t) if t.is_empty()));
        }
        let a = normalize(&text);
        let b = normalize(&other);
        assert!(equivalent(&a, &a), "{text:?} -> {a:?}");
        assert_eq!(equivalent(&a, &b), equivalent(&b, &a));
        let _ = extract_choice(&text);
        let _ = reference_answer(&other);
        let _ = RegexVerifier::new(&text);
        for v in &verifiers {
            let verdict = v.verify(&text, &other);
            assert!((0.0..=1.0).contains(&verdict.reward), "{text:?}");
        }
    }
}
