//! Power of two choices: of the candidates, two distinct ones drawn at random, and of
//! those the cheaper. Nearly as good as always taking the cheapest of all (the load
//! gap to the best shrinks exponentially), at the cost of looking at two, and without
//! the herd that "always the cheapest" causes when many pickers act on the same
//! slightly stale costs.

use super::Rng;

/// The cheaper of two distinct candidates drawn at random (a tie goes to the first
/// drawn, itself random); the only one when there is one; `None` when there are none.
pub fn pick<'a, T>(
    candidates: &[&'a T],
    rng: &mut Rng,
    mut cost: impl FnMut(&T) -> f64,
) -> Option<&'a T> {
    match candidates {
        [] => None,
        [only] => Some(*only),
        _ => {
            let (a, b) = draw(candidates.len(), rng);
            let (a, b) = (candidates[a], candidates[b]);
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// Two distinct indices below `n` (at least 2), uniformly among the ordered pairs.
pub fn draw(n: usize, rng: &mut Rng) -> (usize, usize) {
    let n = n as u64;
    let a = rng.below(n);
    // A second index distinct from the first.
    let b = (a + 1 + rng.below(n - 1)) % n;
    (a as usize, b as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_drawn_are_distinct_and_the_cheaper_wins() {
        // With three candidates the costliest is always drawn against a cheaper one.
        let costs = [5.0, 1.0, 3.0];
        let candidates: Vec<&f64> = costs.iter().collect();
        let mut rng = Rng::seeded(1);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            let picked = pick(&candidates, &mut rng, |c| *c).unwrap();
            counts[costs.iter().position(|c| c == picked).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        // The cheapest wins both pairs it is in (2 of 3): about two thirds.
        assert!((1800..2200).contains(&counts[1]), "{counts:?}");
        assert!(counts[2] > 800, "{counts:?}");
    }

    #[test]
    fn none_and_one() {
        let mut rng = Rng::seeded(2);
        assert!(pick::<f64>(&[], &mut rng, |c| *c).is_none());
        assert_eq!(pick(&[&7.0], &mut rng, |c| *c), Some(&7.0));
    }
}
