//! What LLM calls cost and whether a job may make another: prices per model, a job's budget,
//! and the [`Meter`] that sums a job's [`StepUsage`]s against it. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::usage::StepUsage;

/// `[llm.prices."<model>"]`: USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

/// The price table, keyed by model name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prices(BTreeMap<String, Price>);

impl Prices {
    pub fn new(table: BTreeMap<String, Price>) -> Prices {
        Prices(table)
    }

    pub fn get(&self, model: &str) -> Option<Price> {
        self.0.get(model).copied()
    }

    /// The cost of a call in USD; `None` when the model has no price.
    pub fn cost(&self, model: &str, input_tokens: u64, output_tokens: u64) -> Option<f64> {
        let p = self.get(model)?;
        Some(
            (input_tokens as f64 * p.input_per_mtok + output_tokens as f64 * p.output_per_mtok)
                / 1_000_000.0,
        )
    }
}

/// A job's limits; `None`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Budget {
    /// Input and output tokens together.
    pub max_tokens: Option<u64>,
    pub max_usd: Option<f64>,
}

impl Budget {
    /// The stricter of two budgets, limit by limit (a job's own budget within the runner's).
    pub fn within(self, other: Budget) -> Budget {
        fn min<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if b < a { b } else { a }),
                (a, b) => a.or(b),
            }
        }
        Budget {
            max_tokens: min(self.max_tokens, other.max_tokens),
            max_usd: min(self.max_usd, other.max_usd),
        }
    }
}

/// A job's LLM totals so far (the job carries them).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Totals {
    pub calls: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The priced calls' cost.
    pub cost_usd: f64,
    /// Calls to a model without a price (their cost is not in `cost_usd`).
    pub unpriced_calls: u32,
}

impl Totals {
    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// Why a call may not start, or why the job must end: a clear sentence for the job's
/// `failed` status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct BudgetExceeded {
    pub reason: String,
    pub totals: Totals,
}

/// Sums one job's calls and enforces its budget.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Meter {
    budget: Budget,
    totals: Totals,
}

fn usd(v: f64) -> String {
    format!("${v:.4}")
}

impl Meter {
    pub fn new(budget: Budget) -> Meter {
        Meter {
            budget,
            totals: Totals::default(),
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// May a call start? Refused when the job has used its budget already, and when a USD
    /// budget is set but the call's model has no price (it could not be enforced).
    pub fn admit(&self, model: &str, priced: bool) -> Result<(), BudgetExceeded> {
        let refuse = |reason: String| {
            Err(BudgetExceeded {
                reason,
                totals: self.totals,
            })
        };
        if let Some(max) = self.budget.max_tokens {
            if self.totals.tokens() >= max {
                return refuse(format!(
                    "LLM budget exceeded: the job has used {} of its {max} tokens; no further model call starts",
                    self.totals.tokens()
                ));
            }
        }
        if let Some(max) = self.budget.max_usd {
            if self.totals.cost_usd >= max {
                return refuse(format!(
                    "LLM budget exceeded: the job has spent {} of its {}; no further model call starts",
                    usd(self.totals.cost_usd),
                    usd(max)
                ));
            }
            if !priced {
                return refuse(format!(
                    "the job has a USD budget ({}) but the model {model} has no price: add [llm.prices.\"{model}\"] to the runner's config",
                    usd(max)
                ));
            }
        }
        Ok(())
    }

    /// Adds a call's usage (always: what was used was used) and says whether the job is now over
    /// its budget.
    pub fn record(&mut self, usage: &StepUsage) -> Result<(), BudgetExceeded> {
        let t = &mut self.totals;
        t.calls += 1;
        t.input_tokens += usage.input_tokens;
        t.output_tokens += usage.output_tokens;
        match usage.cost_usd {
            Some(c) => t.cost_usd += c,
            None => t.unpriced_calls += 1,
        }
        let over = |reason: String| {
            Err(BudgetExceeded {
                reason,
                totals: self.totals,
            })
        };
        if let Some(max) = self.budget.max_tokens {
            if self.totals.tokens() > max {
                return over(format!(
                    "LLM budget exceeded: the job used {} tokens, over its budget of {max} (the last call to {} used {})",
                    self.totals.tokens(),
                    usage.model,
                    usage.input_tokens + usage.output_tokens
                ));
            }
        }
        if let Some(max) = self.budget.max_usd {
            if self.totals.cost_usd > max {
                return over(format!(
                    "LLM budget exceeded: the job spent {}, over its budget of {} (the last call to {} cost {})",
                    usd(self.totals.cost_usd),
                    usd(max),
                    usage.model,
                    usd(usage.cost_usd.unwrap_or(0.0))
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, cost: Option<f64>) -> StepUsage {
        StepUsage {
            provider: "p".into(),
            model: "m".into(),
            input_tokens: input,
            output_tokens: output,
            cost_usd: cost,
            ..Default::default()
        }
    }

    #[test]
    fn prices_are_per_million_tokens() {
        let p = Prices::new(BTreeMap::from([(
            "m".to_string(),
            Price {
                input_per_mtok: 3.0,
                output_per_mtok: 15.0,
            },
        )]));
        assert_eq!(p.cost("m", 1_000_000, 0), Some(3.0));
        let c = p.cost("m", 1000, 2000).unwrap();
        assert!((c - 0.033).abs() < 1e-12, "{c}");
        assert_eq!(p.cost("n", 1, 1), None);
    }

    #[test]
    fn an_unlimited_meter_only_sums() {
        let mut m = Meter::default();
        for _ in 0..3 {
            m.admit("m", false).unwrap();
            m.record(&usage(10, 5, None)).unwrap();
        }
        m.record(&usage(1, 1, Some(0.25))).unwrap();
        assert_eq!(
            m.totals(),
            Totals {
                calls: 4,
                input_tokens: 31,
                output_tokens: 16,
                cost_usd: 0.25,
                unpriced_calls: 3
            }
        );
    }

    #[test]
    fn a_token_budget_reports_the_call_that_ends_over_it_and_refuses_the_next() {
        let mut m = Meter::new(Budget {
            max_tokens: Some(100),
            max_usd: None,
        });
        m.admit("m", false).unwrap();
        m.record(&usage(40, 20, None)).unwrap();
        m.admit("m", false).unwrap();
        m.record(&usage(30, 10, None)).unwrap(); // exactly 100: at the limit, not over
        let refused = m.admit("m", false).unwrap_err();
        assert!(
            refused.reason.contains("used 100 of its 100 tokens"),
            "{refused}"
        );
        let mut m = Meter::new(Budget {
            max_tokens: Some(100),
            max_usd: None,
        });
        m.record(&usage(90, 0, None)).unwrap();
        let over = m.record(&usage(8, 5, None)).unwrap_err();
        assert_eq!(
            over.reason,
            "LLM budget exceeded: the job used 103 tokens, over its budget of 100 (the last call to m used 13)"
        );
        assert_eq!(over.totals.tokens(), 103);
        assert_eq!(m.totals().calls, 2, "the call that went over is counted");
    }

    #[test]
    fn a_usd_budget_needs_prices() {
        let mut m = Meter::new(Budget {
            max_tokens: None,
            max_usd: Some(0.10),
        });
        let e = m.admit("llama", false).unwrap_err();
        assert!(e.reason.contains("[llm.prices.\"llama\"]"), "{e}");
        m.admit("m", true).unwrap();
        m.record(&usage(1, 1, Some(0.06))).unwrap();
        let e = m.record(&usage(1, 1, Some(0.06))).unwrap_err();
        assert!(
            e.reason
                .contains("spent $0.1200, over its budget of $0.1000"),
            "{e}"
        );
        assert!(m.admit("m", true).is_err());
    }

    #[test]
    fn the_stricter_budget_wins() {
        let runner = Budget {
            max_tokens: Some(1000),
            max_usd: None,
        };
        let job = Budget {
            max_tokens: Some(5000),
            max_usd: Some(1.0),
        };
        assert_eq!(
            job.within(runner),
            Budget {
                max_tokens: Some(1000),
                max_usd: Some(1.0)
            }
        );
        assert_eq!(
            Budget::default().within(Budget::default()),
            Budget::default()
        );
    }
}
