//! Stop strings matched on decoded text across token boundaries. Text that could still be
//! the start of a stop string is held back from the stream until it is decided.

/// Tracks one trace's text and the stop strings it must end at.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    longest: usize,
    text: String,
    emitted: usize,
    stopped: bool,
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl StopMatcher {
    /// A matcher for these stop strings.
    pub fn new(stops: &[String]) -> Self {
        Self {
            longest: stops.iter().map(|s| s.len()).max().unwrap_or(0),
            stops: stops.to_vec(),
            ..Default::default()
        }
    }

    /// Appends decoded text; returns the part now safe to emit and whether a stop string
    /// was found (the text is then cut where it begins).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let old_len = self.text.len();
        self.text.push_str(piece);
        if self.longest > 0 {
            let from = floor_char_boundary(&self.text, old_len.saturating_sub(self.longest - 1));
            let hit = self
                .stops
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
                .min();
            if let Some(at) = hit {
                self.text.truncate(at.max(self.emitted));
                self.stopped = true;
                return (self.take(self.text.len()), true);
            }
        }
        let held = self.pending_prefix_len();
        let safe = floor_char_boundary(&self.text, self.text.len() - held);
        (self.take(safe), false)
    }

    /// Everything not yet emitted (at the end of a trace).
    pub fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    /// The text released so far (never part of a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn pending_prefix_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for k in (1..s.len().min(self.text.len() + 1)).rev() {
                if k <= best {
                    break;
                }
                if self.text.as_bytes().ends_with(&s.as_bytes()[..k]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    fn take(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}
