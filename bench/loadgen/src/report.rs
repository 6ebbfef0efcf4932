//! The targets each scenario is judged against, and how they are printed.

/// One target: what was asked, what was measured, and whether it was met.
pub struct TargetLine {
    pub target: String,
    pub measured: String,
    pub met: bool,
    /// How far from the goal, in the target's own terms ("+0.4 ms over", "ratio 2.7 > 2").
    pub margin: String,
}

impl TargetLine {
    /// A "measured <= limit" target.
    pub fn at_most(target: &str, measured: f64, limit: f64, unit: &str, what: String) -> Self {
        let met = measured <= limit;
        let margin = if met {
            format!("{} {unit} under", fmt_number(limit - measured))
        } else {
            format!(
                "{} {unit} over ({:.2}x the limit)",
                fmt_number(measured - limit),
                measured / limit
            )
        };
        Self {
            target: target.to_owned(),
            measured: what,
            met: !measured.is_nan() && met,
            margin,
        }
    }

    /// A "measured >= floor" target.
    pub fn at_least(target: &str, measured: f64, floor: f64, what: String) -> Self {
        let met = measured >= floor;
        let margin = if met {
            format!("{} above", fmt_number(measured - floor))
        } else {
            format!("{} short", fmt_number(floor - measured))
        };
        Self {
            target: target.to_owned(),
            measured: what,
            met: !measured.is_nan() && met,
            margin,
        }
    }

    pub fn not_measured(target: &str, why: &str) -> Self {
        Self {
            target: target.to_owned(),
            measured: why.to_owned(),
            met: false,
            margin: "n/a".to_owned(),
        }
    }
}

fn fmt_number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

pub fn print_targets(lines: &[TargetLine]) {
    println!();
    println!("### Targets");
    println!();
    println!("| target | measured | met? | margin |");
    println!("|---|---|---|---|");
    for line in lines {
        println!(
            "| {} | {} | {} | {} |",
            line.target,
            line.measured,
            if line.met { "met" } else { "MISSED" },
            line.margin
        );
    }
}
