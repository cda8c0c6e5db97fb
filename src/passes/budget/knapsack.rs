//! The multiple-choice knapsack of a size budget: one treatment per linear, the sum of their
//! bytes within the budget, the sum of their damage least.
//!
//! ```text
//!   minimise Σ_i cost[i][c_i]   subject to   Σ_i bytes[i][c_i] ≤ cap,   one c_i per item i
//! ```
//!
//! Solved by dynamic programming over bytes (Kellerer, Pferschy, Pisinger, "Knapsack
//! Problems", §11.5): `best[b]` is the least cost of the items so far within `b` units. Each
//! item's bytes above its smallest candidate are counted in units of `u` bytes, rounded up, so
//! every solution the table holds fits the true budget; `u` is 1 (the table is exact) unless
//! the budget is too large for a table of [`MAX_CELLS`] cells, when it is the smallest unit
//! that fits. The slack the rounding leaves (under one unit per item) is then closed greedily
//! with the true byte counts: the swap that lowers the cost most and still fits, until none
//! does.

use anyhow::{bail, Result};

/// Largest DP table (items × capacity units), one byte per cell for the choices.
pub const MAX_CELLS: usize = 16 << 20;

/// One candidate of an item: its exact bytes and its cost (damage).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub bytes: u64,
    pub cost: f64,
}

/// The candidate index of each item: least total cost with total bytes ≤ `cap`. Refused when
/// even the smallest candidates exceed `cap`, or an item has no candidate (or more than 255).
pub fn solve(items: &[Vec<Choice>], cap: u64) -> Result<Vec<usize>> {
    solve_within(items, cap, MAX_CELLS)
}

/// [`solve`] with a table of at most `max_cells` cells.
fn solve_within(items: &[Vec<Choice>], cap: u64, max_cells: usize) -> Result<Vec<usize>> {
    let n = items.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    for (i, it) in items.iter().enumerate() {
        if it.is_empty() || it.len() > 255 {
            bail!("knapsack item {i} has {} candidates (1 to 255)", it.len());
        }
        if let Some(c) = it.iter().find(|c| !c.cost.is_finite()) {
            bail!("knapsack item {i} has a non-finite cost {}", c.cost);
        }
    }
    let base: Vec<u64> = items
        .iter()
        .map(|it| it.iter().map(|c| c.bytes).min().unwrap_or(0))
        .collect();
    let floor: u64 = base.iter().sum();
    if floor > cap {
        bail!("the budget of {cap} bytes is below the smallest candidates' {floor} bytes");
    }
    let room = cap - floor;
    // capacity units: as fine as the table allows
    let max_units = (max_cells / n).max(1) as u64;
    let unit = room.div_ceil(max_units).max(1);
    let units = (room / unit) as usize;
    let w = |i: usize, c: usize| (items[i][c].bytes - base[i]).div_ceil(unit) as usize;
    // best[b]: least cost within b units (monotone in b); choice[i][b]: item i's pick there
    let mut best = vec![0f64; units + 1];
    let mut choice = vec![0u8; n * (units + 1)];
    let mut next = vec![f64::INFINITY; units + 1];
    for i in 0..n {
        next.fill(f64::INFINITY);
        let row = &mut choice[i * (units + 1)..(i + 1) * (units + 1)];
        for (c, cand) in items[i].iter().enumerate() {
            let wc = w(i, c);
            if wc > units {
                continue;
            }
            for b in wc..=units {
                let v = best[b - wc] + cand.cost;
                if v < next[b] {
                    next[b] = v;
                    row[b] = c as u8;
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
    }
    // walk back from the full capacity
    let mut pick = vec![0usize; n];
    let mut b = units;
    for i in (0..n).rev() {
        let c = choice[i * (units + 1) + b] as usize;
        pick[i] = c;
        b -= w(i, c);
    }
    // close the rounding slack with true bytes
    let mut used: u64 = pick
        .iter()
        .enumerate()
        .map(|(i, &c)| items[i][c].bytes)
        .sum();
    loop {
        let mut swap: Option<(usize, usize, f64)> = None;
        for (i, it) in items.iter().enumerate() {
            let cur = it[pick[i]];
            for (c, cand) in it.iter().enumerate() {
                let gain = cur.cost - cand.cost;
                let fits = used - cur.bytes + cand.bytes <= cap;
                if fits && gain > 0.0 && swap.is_none_or(|(_, _, g)| gain > g) {
                    swap = Some((i, c, gain));
                }
            }
        }
        let Some((i, c, _)) = swap else { break };
        used = used - items[i][pick[i]].bytes + items[i][c].bytes;
        pick[i] = c;
    }
    Ok(pick)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Every assignment, the cheapest that fits.
    fn brute(items: &[Vec<Choice>], cap: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; items.len()];
        loop {
            let bytes: u64 = idx
                .iter()
                .enumerate()
                .map(|(i, &c)| items[i][c].bytes)
                .sum();
            let cost: f64 = idx.iter().enumerate().map(|(i, &c)| items[i][c].cost).sum();
            if bytes <= cap && best.is_none_or(|b| cost < b) {
                best = Some(cost);
            }
            let mut k = 0;
            loop {
                if k == items.len() {
                    return best;
                }
                idx[k] += 1;
                if idx[k] < items[k].len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
        }
    }

    fn random_items(seed: &mut u64, n: usize, k: usize, scale: u64) -> Vec<Vec<Choice>> {
        (0..n)
            .map(|_| {
                (0..1 + rng(seed) as usize % k)
                    .map(|_| Choice {
                        bytes: 1 + rng(seed) % scale,
                        cost: (rng(seed) % 1000) as f64 / 7.0,
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn equals_brute_force_on_random_instances() {
        let mut seed = 7u64;
        for _ in 0..300 {
            let n = 1 + rng(&mut seed) as usize % 6;
            let items = random_items(&mut seed, n, 4, 50);
            let lo: u64 = items
                .iter()
                .map(|it| it.iter().map(|c| c.bytes).min().unwrap())
                .sum();
            let hi: u64 = items
                .iter()
                .map(|it| it.iter().map(|c| c.bytes).max().unwrap())
                .sum();
            let cap = lo + rng(&mut seed) % (hi - lo + 1);
            let pick = solve(&items, cap).unwrap();
            let bytes: u64 = pick
                .iter()
                .enumerate()
                .map(|(i, &c)| items[i][c].bytes)
                .sum();
            let cost: f64 = pick
                .iter()
                .enumerate()
                .map(|(i, &c)| items[i][c].cost)
                .sum();
            assert!(bytes <= cap, "{bytes} > {cap}");
            let want = brute(&items, cap).unwrap();
            assert!((cost - want).abs() < 1e-9, "{cost} vs optimum {want}");
        }
    }

    #[test]
    fn coarse_units_fit_and_stay_within_one_unit_per_item_of_the_optimum() {
        // bytes far beyond the table: the unit is > 1, the answer must still fit, and be no
        // worse than the optimum of a budget smaller by one unit per item
        let mut seed = 11u64;
        for _ in 0..40 {
            let n = 2 + rng(&mut seed) as usize % 5;
            let items = random_items(&mut seed, n, 4, 40_000_000_000);
            let lo: u64 = items
                .iter()
                .map(|it| it.iter().map(|c| c.bytes).min().unwrap())
                .sum();
            let hi: u64 = items
                .iter()
                .map(|it| it.iter().map(|c| c.bytes).max().unwrap())
                .sum();
            let cap = lo + rng(&mut seed) % (hi - lo + 1);
            let cells = 600;
            let pick = solve_within(&items, cap, cells).unwrap();
            let bytes: u64 = pick
                .iter()
                .enumerate()
                .map(|(i, &c)| items[i][c].bytes)
                .sum();
            let cost: f64 = pick
                .iter()
                .enumerate()
                .map(|(i, &c)| items[i][c].cost)
                .sum();
            assert!(bytes <= cap);
            let unit = (cap - lo).div_ceil((cells / n) as u64).max(1);
            assert!(unit > 1, "the test exercises coarse units");
            let tighter = cap.saturating_sub(unit * n as u64).max(lo);
            let bound = brute(&items, tighter).unwrap();
            assert!(
                cost <= bound + 1e-9,
                "{cost} worse than the optimum {bound} at {tighter}"
            );
        }
    }

    #[test]
    fn refuses_a_budget_below_the_smallest_candidates() {
        let items = vec![
            vec![
                Choice {
                    bytes: 10,
                    cost: 1.0
                },
                Choice {
                    bytes: 5,
                    cost: 2.0
                }
            ];
            3
        ];
        let e = solve(&items, 14).unwrap_err().to_string();
        assert!(e.contains("15 bytes"), "{e}");
        assert_eq!(solve(&items, 15).unwrap(), vec![1, 1, 1]);
        assert_eq!(solve(&items, 30).unwrap(), vec![0, 0, 0]);
        // one upgrade fits in 20
        let p = solve(&items, 20).unwrap();
        assert_eq!(p.iter().filter(|&&c| c == 0).count(), 1);
    }
}
