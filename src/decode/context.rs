//! Which tokens the model sees when a sequence outgrows its n_positions.
//!
//! GPT-2's positions are absolute, so a KV cache cannot slide. Every decoder here predicts the
//! token at index t from the window `x[context_start(t)..t]`, where the start jumps forward by
//! half a window at a time: a cache is rebuilt once per half window, and every decoder (plain,
//! cached, speculative) conditions each token on exactly the same tokens, so their greedy
//! outputs can be compared token for token.

/// Start of the window used to predict token index `t` (the window is `x[start..t]`, never
/// longer than `n_positions`).
pub fn context_start(t: usize, n_positions: usize) -> usize {
    if t <= n_positions {
        return 0;
    }
    let half = (n_positions / 2).max(1);
    (t - n_positions).div_ceil(half) * half
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_never_exceed_n_positions_and_jump_by_half_a_window() {
        let p = 8;
        for t in 1..100 {
            let s = context_start(t, p);
            assert!(t - s <= p && t - s > p / 2 || t <= p, "t {t} start {s}");
            assert!(s.is_multiple_of(4) && s <= context_start(t + 1, p));
        }
        assert_eq!((context_start(8, 8), context_start(9, 8), context_start(12, 8), context_start(13, 8)), (0, 4, 4, 8));
    }
}
