//! The shortest age `inbox purge` accepts without `--force`.
//!
//! A purged row no longer deduplicates: a copy of its message that arrives afterwards (a retry
//! copy whose original was redelivered and processed, a redelivery, a DLQ replay) is processed
//! again. The floor keeps the purge age above the time such a copy can still be on its way.

use oncely::config::Config;
use std::time::Duration;

/// Never less than this, whatever is configured: redeliveries and replays of the last day.
pub(crate) const MIN_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The floor and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Floor {
    pub(crate) age: Duration,
    /// The consumer whose retry tier set it, with that tier; `None`: the one-day minimum.
    pub(crate) tier_of: Option<(String, Duration)>,
}

impl std::fmt::Display for Floor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.age))?;
        match &self.tier_of {
            Some((consumer, _)) => write!(f, " (the longest retry tier of consumer {consumer})"),
            None => write!(f, " (the one-day minimum)"),
        }
    }
}

/// `max(one day, the longest retry tier)` of `consumer` when the configuration has it, else of
/// every configured consumer (an unknown name cannot narrow the floor).
pub(crate) fn purge_floor(config: Option<&Config>, consumer: Option<&str>) -> Floor {
    let mut floor = Floor {
        age: MIN_RETENTION,
        tier_of: None,
    };
    let Some(config) = config else { return floor };
    let only = consumer.filter(|name| config.consumers.contains_key(*name));
    for (name, settings) in &config.consumers {
        if only.is_some_and(|only| only != name) {
            continue;
        }
        if let Some(longest) = settings.retry_policy.tiers().iter().max()
            && *longest > floor.age
        {
            floor = Floor {
                age: *longest,
                tier_of: Some((name.clone(), *longest)),
            };
        }
    }
    floor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse("oncely.toml", text, |_| None).expect("valid configuration")
    }

    const TWO: &str = "[consumers.billing]\nqueue = \"b\"\nexchange = \"e\"\nretry_tiers = [\"1s\", \"36h\"]\n\
                       [consumers.audit]\nqueue = \"a\"\nexchange = \"e\"\nretry_tiers = [\"3d\"]\n";

    #[test]
    fn without_a_configuration_the_floor_is_one_day() {
        assert_eq!(purge_floor(None, None).age, MIN_RETENTION);
    }

    #[test]
    fn short_tiers_leave_the_one_day_minimum() {
        let c = config(
            "[consumers.billing]\nqueue = \"b\"\nexchange = \"e\"\nretry_tiers = [\"1s\", \"1h\"]\n",
        );
        assert_eq!(purge_floor(Some(&c), None).age, MIN_RETENTION);
    }

    #[test]
    fn the_longest_tier_of_the_purged_consumer_raises_the_floor() {
        let c = config(TWO);
        let floor = purge_floor(Some(&c), Some("billing"));
        assert_eq!(floor.age, Duration::from_secs(36 * 3600));
        assert_eq!(
            floor.to_string(),
            "1day 12h (the longest retry tier of consumer billing)"
        );
    }

    #[test]
    fn every_consumer_counts_when_none_or_an_unknown_one_is_named() {
        let c = config(TWO);
        let three_days = Duration::from_secs(3 * 24 * 3600);
        assert_eq!(purge_floor(Some(&c), None).age, three_days);
        assert_eq!(purge_floor(Some(&c), Some("elsewhere")).age, three_days);
    }
}
