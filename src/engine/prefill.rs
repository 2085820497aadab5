//! The prefill policy: how a step's budget of prompt tokens is shared among the requests
//! still prefilling (shortest first, the oldest always advancing).

/// How many prompt tokens each request prefills this step (`remaining[i]`: the tokens
/// request i has left to prefill, None once it decodes), within `chunk` in all. The oldest
/// request still prefilling gets a quarter of the chunk, so a long prompt always advances;
/// the others go shortest first, so a short prompt is not held behind a long one for the
/// long one's whole prefill. Only when no other request is prefilling does the oldest get
/// the rest: a step that carries a short prompt stays short (its cost is its tokens).
pub(super) fn prefill_grants(remaining: &[Option<usize>], chunk: usize) -> Vec<usize> {
    let mut grants = vec![0; remaining.len()];
    let Some(oldest) = remaining.iter().position(Option::is_some) else {
        return grants;
    };
    let oldest_left = remaining[oldest].unwrap_or(0);
    grants[oldest] = oldest_left.min(chunk.div_ceil(4));
    let mut left = chunk - grants[oldest];
    let mut others: Vec<(usize, usize)> = remaining
        .iter()
        .enumerate()
        .skip(oldest + 1)
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .collect();
    // Stable: equal lengths keep their admission order.
    others.sort_by_key(|&(_, r)| r);
    for &(i, r) in &others {
        grants[i] = r.min(left);
        left -= grants[i];
    }
    if others.is_empty() {
        grants[oldest] = oldest_left.min(chunk);
    }
    grants
}

#[cfg(test)]
mod tests {
    use super::prefill_grants;

    #[test]
    fn prefill_goes_shortest_first_and_the_oldest_always_advances() {
        // Alone, a long prompt takes the whole chunk.
        assert_eq!(prefill_grants(&[Some(2400)], 512), vec![512]);
        // A short prompt behind a long one finishes in this step, which stays light: the
        // long one keeps its quarter only.
        assert_eq!(prefill_grants(&[Some(2400), Some(4)], 512), vec![128, 4]);
        // Decoding requests (None) get nothing.
        assert_eq!(
            prefill_grants(&[None, Some(100), None, Some(30)], 64),
            vec![0, 16, 0, 30]
        );
        // Many short prompts cannot starve the oldest: it keeps a quarter of the chunk.
        let many: Vec<Option<usize>> = std::iter::once(Some(2400))
            .chain(std::iter::repeat_n(Some(200), 8))
            .collect();
        let g = prefill_grants(&many, 512);
        assert_eq!(g[0], 128);
        assert_eq!(g[1..], [200, 184, 0, 0, 0, 0, 0, 0]);
        assert_eq!(g.iter().sum::<usize>(), 512);
        // Never more than a request has left, never more than the chunk.
        assert_eq!(prefill_grants(&[Some(3), Some(2)], 512), vec![3, 2]);
        assert_eq!(prefill_grants(&[Some(1)], 1), vec![1]);
        assert_eq!(prefill_grants(&[None, None], 8), vec![0, 0]);
    }
}
