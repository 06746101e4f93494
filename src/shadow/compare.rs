//! Comparing a primary and a shadow answer at a JSON pointer.

use serde_json::Value;

/// The result of one comparison, as `abproxy_shadow_comparisons_total{outcome}` counts it.
#[derive(Debug, Clone, PartialEq)]
pub enum Comparison {
    /// Equal values, or numbers within the tolerance.
    Match {
        abs_diff: Option<f64>,
    },
    Mismatch {
        abs_diff: Option<f64>,
    },
    /// Either answer is not JSON or lacks the pointer.
    Unparsable,
}

impl Comparison {
    pub fn outcome(&self) -> &'static str {
        match self {
            Comparison::Match { .. } => "match",
            Comparison::Mismatch { .. } => "mismatch",
            Comparison::Unparsable => "unparsable",
        }
    }

    pub fn abs_diff(&self) -> Option<f64> {
        match self {
            Comparison::Match { abs_diff } | Comparison::Mismatch { abs_diff } => *abs_diff,
            Comparison::Unparsable => None,
        }
    }
}

/// Numbers compare by absolute difference against `tolerance`; anything else by equality.
pub fn compare(primary: Option<&Value>, shadow: Option<&Value>, tolerance: f64) -> Comparison {
    let (Some(primary), Some(shadow)) = (primary, shadow) else {
        return Comparison::Unparsable;
    };
    match (primary.as_f64(), shadow.as_f64()) {
        (Some(a), Some(b)) => {
            let abs_diff = Some((a - b).abs());
            if (a - b).abs() <= tolerance {
                Comparison::Match { abs_diff }
            } else {
                Comparison::Mismatch { abs_diff }
            }
        }
        _ if primary == shadow => Comparison::Match { abs_diff: None },
        _ => Comparison::Mismatch { abs_diff: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(body: &str) -> Option<Value> {
        crate::json_pointer::JsonPointer::new("/prediction")?.value_in(body.as_bytes())
    }

    #[test]
    fn equal_numbers_match_with_zero_difference() {
        let result = compare(
            at(r#"{"prediction":0.5}"#).as_ref(),
            at(r#"{"prediction":0.5}"#).as_ref(),
            0.0,
        );
        assert_eq!(
            result,
            Comparison::Match {
                abs_diff: Some(0.0)
            }
        );
    }

    #[test]
    fn numbers_within_tolerance_match_and_beyond_it_mismatch() {
        let (a, b) = (json!(0.50), json!(0.53));
        assert_eq!(compare(Some(&a), Some(&b), 0.05).outcome(), "match");
        let mismatch = compare(Some(&a), Some(&b), 0.01);
        assert_eq!(mismatch.outcome(), "mismatch");
        assert!((mismatch.abs_diff().unwrap_or_default() - 0.03).abs() < 1e-9);
    }

    #[test]
    fn other_values_compare_by_equality() {
        assert_eq!(
            compare(Some(&json!("cat")), Some(&json!("cat")), 0.0).outcome(),
            "match"
        );
        assert_eq!(
            compare(Some(&json!(["a", 1])), Some(&json!(["a", 2])), 0.0).outcome(),
            "mismatch"
        );
        assert_eq!(
            compare(Some(&json!("1")), Some(&json!(1)), 0.0).outcome(),
            "mismatch"
        );
    }

    #[test]
    fn non_json_or_missing_pointers_are_unparsable() {
        assert_eq!(at("<html>oops</html>"), None);
        assert_eq!(at(r#"{"score":1}"#), None);
        assert_eq!(compare(None, Some(&json!(1)), 0.0), Comparison::Unparsable);
        assert_eq!(compare(Some(&json!(1)), None, 0.0), Comparison::Unparsable);
    }
}
