//! The demo's scenario: regions, the paths between them, relays, bots,
//! faults and the world, read from TOML.
//!
//! [`Scenario::parse`] reads and [`Scenario::validate`]s a file: unknown
//! keys, unknown regions or relays, missing or duplicate paths, and values
//! out of range are refused with a message that names the offending entry.
//! The default scenario ([`DEFAULT`], `cli/scenarios/default.toml`) is
//! compiled into the binary so that `statecast demo` runs from any
//! directory.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;

/// The default scenario's text (`cli/scenarios/default.toml`).
pub const DEFAULT: &str = include_str!("../../scenarios/default.toml");

/// Most bots a scenario may ask for: a few thousand connections is what one
/// machine's demo can hold, far past what two cores animate smoothly.
pub const MAX_BOTS: usize = 5000;

/// Longest RTT a path may have, in milliseconds.
pub const MAX_RTT_MS: f64 = 5000.0;

/// A whole scenario.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The world the origin runs.
    pub world: World,
    /// Where the origin is.
    pub origin: Origin,
    /// How bots behave.
    #[serde(default)]
    pub bots: Bots,
    /// The regions, each with its bots.
    pub regions: Vec<Region>,
    /// Paths between regions: one per unordered pair, and one per region
    /// for paths within it.
    pub paths: Vec<Path>,
    /// The relays.
    pub relays: Vec<Relay>,
    /// Faults, in any order.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// The world.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct World {
    /// Built-in world; only `plaza` has the positions bots' areas need.
    pub name: String,
    /// Avatars in the plaza.
    pub avatars: u32,
    /// Seed of the world.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Radius of each bot's area of interest, in metres.
    pub area_radius_m: f64,
    /// Edge of the relays' interest cells, in metres: a bot gets the cells
    /// its area touches, one delta chunk per cell.
    #[serde(default = "default_cell_m")]
    pub cell_m: f64,
}

/// 100 m: an area of about 200 m radius touches some 20 cells. Smaller
/// cells send fewer entities beyond the radius but more chunks, and each
/// chunk costs the client a decoder set-up.
fn default_cell_m() -> f64 {
    100.0
}

fn default_seed() -> u64 {
    1
}

/// The origin.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// Its region.
    pub region: String,
}

/// How bots behave.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Bots {
    /// Inputs per second each bot sends.
    pub input_hz: f64,
    /// A relay silent this long is dead to a bot.
    pub stall_timeout_ms: u64,
    /// Bots join over this many seconds.
    pub ramp_s: f64,
}

impl Default for Bots {
    fn default() -> Bots {
        Bots {
            // A player's stick changes a few times a second.
            input_hz: 5.0,
            // 16 ticks at 20 Hz: a few lost datagrams in a row are not a
            // dead relay, a second of silence is.
            stall_timeout_ms: 800,
            // Two seconds: a few hundred handshakes spread out.
            ramp_s: 2.0,
        }
    }
}

/// A region and the bots in it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Its name, also its DNS label: lowercase letters, digits, `-`.
    pub name: String,
    /// Bots in it.
    pub bots: usize,
}

/// The paths between two regions (or within one), both ways.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Path {
    /// The two regions (the same one twice for paths within a region).
    pub between: [String; 2],
    /// Client to relay RTT, in milliseconds.
    pub rtt_ms: f64,
    /// Client to relay jitter, in milliseconds (each direction draws up to
    /// half of it).
    #[serde(default)]
    pub jitter_ms: f64,
    /// Client to relay loss, per packet and direction, `0.0..1.0`.
    #[serde(default)]
    pub loss: f64,
    /// Relay to origin RTT, in milliseconds.
    pub backbone_rtt_ms: f64,
}

/// A relay.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// Its id, also its DNS label.
    pub name: String,
    /// Its region.
    pub region: String,
}

/// A fault: exactly one of `kill` and `drain`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Seconds from the start.
    pub at_s: f64,
    /// Crash this relay: its links go silent, then it stops.
    #[serde(default)]
    pub kill: Option<String>,
    /// Drain this relay: goaway to its clients, it exits once they left.
    #[serde(default)]
    pub drain: Option<String>,
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A crash.
    Kill,
    /// A drain.
    Drain,
}

impl Fault {
    /// What it does and to which relay (after [`Scenario::validate`]).
    pub fn action(&self) -> (FaultKind, &str) {
        match (&self.kill, &self.drain) {
            (Some(relay), _) => (FaultKind::Kill, relay),
            (None, Some(relay)) => (FaultKind::Drain, relay),
            (None, None) => (FaultKind::Kill, ""),
        }
    }

    /// When, from the start.
    pub fn at(&self) -> Duration {
        Duration::from_secs_f64(self.at_s)
    }
}

/// The conditions of the paths between two regions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conditions {
    /// Client to relay RTT.
    pub rtt: Duration,
    /// Client to relay jitter (both directions together).
    pub jitter: Duration,
    /// Client to relay loss per packet and direction.
    pub loss: f64,
    /// Relay to origin RTT.
    pub backbone_rtt: Duration,
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v / 1000.0)
}

fn label_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl Scenario {
    /// The default scenario.
    pub fn default_scenario() -> Scenario {
        Scenario::parse(DEFAULT).expect("the shipped default scenario is valid")
    }

    /// Parses and validates a scenario's TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let scenario: Scenario = toml::from_str(text).context("not a valid scenario")?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Reads a scenario file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the scenario {}", path.display()))?;
        Scenario::parse(&text).with_context(|| format!("in the scenario {}", path.display()))
    }

    /// Checks what TOML cannot: names, references, ranges, a path for every
    /// pair of regions.
    pub fn validate(&self) -> anyhow::Result<()> {
        let w = &self.world;
        ensure!(
            w.name == "plaza",
            "world.name = {:?}: the demo runs the plaza (its bots need positions for their areas)",
            w.name
        );
        ensure!(
            (1..=proto::schema::MAX_ENTITIES).contains(&w.avatars),
            "world.avatars = {}: must be 1 to {}",
            w.avatars,
            proto::schema::MAX_ENTITIES
        );
        ensure!(
            w.area_radius_m.is_finite() && w.area_radius_m > 0.0 && w.area_radius_m <= 10_000.0,
            "world.area_radius_m = {}: must be a positive number of metres up to 10000",
            w.area_radius_m
        );
        ensure!(
            w.cell_m.is_finite() && (1.0..=10_000.0).contains(&w.cell_m),
            "world.cell_m = {}: must be 1 to 10000 metres",
            w.cell_m
        );
        let b = &self.bots;
        ensure!(
            b.input_hz.is_finite() && (0.0..=60.0).contains(&b.input_hz),
            "bots.input_hz = {}: must be 0 to 60",
            b.input_hz
        );
        ensure!(
            (100..=60_000).contains(&b.stall_timeout_ms),
            "bots.stall_timeout_ms = {}: must be 100 to 60000",
            b.stall_timeout_ms
        );
        ensure!(
            b.ramp_s.is_finite() && (0.0..=600.0).contains(&b.ramp_s),
            "bots.ramp_s = {}: must be 0 to 600 seconds",
            b.ramp_s
        );

        ensure!(
            !self.regions.is_empty(),
            "no regions: give at least one [[regions]]"
        );
        let mut regions = BTreeSet::new();
        for r in &self.regions {
            ensure!(
                label_ok(&r.name),
                "region {:?}: a name is 1 to 24 lowercase letters, digits and inner '-'",
                r.name
            );
            ensure!(
                regions.insert(r.name.as_str()),
                "region {:?} is listed twice",
                r.name
            );
        }
        let total: usize = self.regions.iter().map(|r| r.bots).sum();
        ensure!(total > 0, "no bots: give some region bots > 0");
        ensure!(total <= MAX_BOTS, "{total} bots: at most {MAX_BOTS}");
        let known = |what: &str, name: &str| -> anyhow::Result<()> {
            if regions.contains(name) {
                Ok(())
            } else {
                bail!(
                    "{what}: unknown region {name:?} (regions: {})",
                    regions.iter().copied().collect::<Vec<_>>().join(", ")
                )
            }
        };
        known("origin.region", &self.origin.region)?;

        let mut pairs = BTreeSet::new();
        for p in &self.paths {
            let [a, c] = &p.between;
            let what = format!("path between {a:?} and {c:?}");
            known(&what, a)?;
            known(&what, c)?;
            let key = if a <= c {
                (a.as_str(), c.as_str())
            } else {
                (c.as_str(), a.as_str())
            };
            ensure!(pairs.insert(key), "{what} is given twice");
            for (field, v) in [("rtt_ms", p.rtt_ms), ("backbone_rtt_ms", p.backbone_rtt_ms)] {
                ensure!(
                    v.is_finite() && (0.0..=MAX_RTT_MS).contains(&v),
                    "{what}: {field} = {v}: must be 0 to {MAX_RTT_MS} ms"
                );
            }
            ensure!(
                p.jitter_ms.is_finite() && (0.0..=MAX_RTT_MS).contains(&p.jitter_ms),
                "{what}: jitter_ms = {}: must be 0 to {MAX_RTT_MS} ms",
                p.jitter_ms
            );
            ensure!(
                p.loss.is_finite() && (0.0..1.0).contains(&p.loss),
                "{what}: loss = {}: must be at least 0 and below 1",
                p.loss
            );
        }
        for a in &regions {
            for c in &regions {
                if a <= c {
                    ensure!(
                        pairs.contains(&(*a, *c)),
                        "no path between {a:?} and {c:?}: every pair of regions (and every region with itself) needs a [[paths]] entry"
                    );
                }
            }
        }

        ensure!(
            !self.relays.is_empty(),
            "no relays: give at least one [[relays]]"
        );
        let mut relays = BTreeSet::new();
        for r in &self.relays {
            ensure!(
                label_ok(&r.name),
                "relay {:?}: a name is 1 to 24 lowercase letters, digits and inner '-'",
                r.name
            );
            ensure!(
                relays.insert(r.name.as_str()),
                "relay {:?} is listed twice",
                r.name
            );
            known(&format!("relay {:?}", r.name), &r.region)?;
        }
        let mut faulted = BTreeMap::new();
        for f in &self.faults {
            ensure!(
                f.at_s.is_finite() && (0.0..=1e6).contains(&f.at_s),
                "fault at_s = {}: must be 0 to 1000000 seconds",
                f.at_s
            );
            let relay = match (&f.kill, &f.drain) {
                (Some(r), None) | (None, Some(r)) => r,
                _ => bail!(
                    "fault at {} s: give exactly one of kill = \"RELAY\" and drain = \"RELAY\"",
                    f.at_s
                ),
            };
            ensure!(
                relays.contains(relay.as_str()),
                "fault at {} s: unknown relay {relay:?} (relays: {})",
                f.at_s,
                relays.iter().copied().collect::<Vec<_>>().join(", ")
            );
            if let Some(earlier) = faulted.insert(relay.clone(), f.at_s) {
                bail!(
                    "relay {relay:?} has two faults (at {earlier} s and {} s): a relay fails once",
                    f.at_s
                );
            }
        }
        Ok(())
    }

    /// The conditions between two regions (either order).
    pub fn conditions(&self, a: &str, b: &str) -> Conditions {
        let path = self
            .paths
            .iter()
            .find(|p| {
                (p.between[0] == a && p.between[1] == b) || (p.between[0] == b && p.between[1] == a)
            })
            .expect("validated: every pair of regions has a path");
        Conditions {
            rtt: ms(path.rtt_ms),
            jitter: ms(path.jitter_ms),
            loss: path.loss,
            backbone_rtt: ms(path.backbone_rtt_ms),
        }
    }

    /// Total bots.
    pub fn bots(&self) -> usize {
        self.regions.iter().map(|r| r.bots).sum()
    }

    /// Scales the bots of every region to `total` in all, keeping their
    /// proportions (largest remainders), each region keeping at least one.
    pub fn scale_bots(&mut self, total: usize) -> anyhow::Result<()> {
        let n = self.regions.len();
        ensure!(
            (n..=MAX_BOTS).contains(&total),
            "--bots {total}: must be at least one per region ({n}) and at most {MAX_BOTS}"
        );
        let old = self.bots().max(1) as f64;
        let exact: Vec<f64> = self
            .regions
            .iter()
            .map(|r| r.bots as f64 * total as f64 / old)
            .collect();
        let mut counts: Vec<usize> = exact.iter().map(|e| (e.floor() as usize).max(1)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&i, &j| {
            (exact[j] - exact[j].floor()).total_cmp(&(exact[i] - exact[i].floor()))
        });
        let mut k = 0;
        while counts.iter().sum::<usize>() < total && k < 2 * n * total {
            counts[order[k % n]] += 1;
            k += 1;
        }
        while counts.iter().sum::<usize>() > total {
            let (i, _) = counts
                .iter()
                .enumerate()
                .max_by_key(|&(_, c)| *c)
                .expect("at least one region");
            counts[i] -= 1;
        }
        for (r, c) in self.regions.iter_mut().zip(counts) {
            r.bots = c;
        }
        Ok(())
    }

    /// The relay named `name`.
    pub fn relay(&self, name: &str) -> Option<&Relay> {
        self.relays.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(edit: impl FnOnce(&mut String)) -> anyhow::Result<Scenario> {
        let mut text = DEFAULT.to_owned();
        edit(&mut text);
        Scenario::parse(&text)
    }

    fn err(edit: impl FnOnce(&mut String)) -> String {
        format!("{:#}", with(edit).expect_err("should be refused"))
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 1, "no scenarios in {}", dir.display());
        let s = Scenario::default_scenario();
        assert!(s.regions.len() >= 3 && s.relays.len() >= 3);
        assert!(s.bots() >= 200);
        // Paths are symmetric and found in either order.
        assert_eq!(
            s.conditions("eu-west", "us-east"),
            s.conditions("us-east", "eu-west")
        );
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_reason() {
        let e = err(|t| *t = t.replace("rtt_ms = 90", "rtt_ms = 90\nrtt = 3"));
        assert!(e.contains("unknown field"), "{e}");
        let e = err(|t| {
            *t = t.replace(
                "between = [\"eu-west\", \"us-east\"]",
                "between = [\"eu-west\", \"mars\"]",
            )
        });
        assert!(e.contains("unknown region \"mars\""), "{e}");
        let e = err(|t| {
            *t = t.replace(
                "between = [\"eu-west\", \"us-east\"]",
                "between = [\"eu-west\", \"eu-west\"]",
            )
        });
        assert!(e.contains("given twice"), "{e}");
        let e = err(|t| *t = t.replace("kill = \"eu-west-1\"", "kill = \"nowhere-1\""));
        assert!(e.contains("unknown relay \"nowhere-1\""), "{e}");
        let e = err(|t| {
            *t = t.replace(
                "kill = \"eu-west-1\"",
                "kill = \"eu-west-1\"\ndrain = \"eu-west-2\"",
            )
        });
        assert!(e.contains("exactly one of"), "{e}");
        let e = err(|t| *t = t.replace("loss = 0.01", "loss = 1.5"));
        assert!(e.contains("loss = 1.5"), "{e}");
        let e = err(|t| *t = t.replace("name = \"plaza\"", "name = \"cubes\""));
        assert!(e.contains("plaza"), "{e}");
        let e = err(|t| {
            *t = t.replace(
                "region = \"eu-west\"\n\n[bots]",
                "region = \"moon\"\n\n[bots]",
            )
        });
        assert!(e.contains("origin.region"), "{e}");
        let e = err(|t| *t = t.replace("name = \"us-east-1\"", "name = \"eu-west-2\""));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn a_missing_pair_is_named() {
        // Drop the us-east <-> ap-southeast path.
        let text = DEFAULT.replace(
            "[[paths]]\nbetween = [\"us-east\", \"ap-southeast\"]",
            "[[unused]]\nbetween = [\"us-east\", \"ap-southeast\"]",
        );
        let start = text.find("[[unused]]").unwrap();
        let end = start + text[start..].find("[[relays]]").unwrap();
        let text = format!("{}{}", &text[..start], &text[end..]);
        let e = format!("{:#}", Scenario::parse(&text).unwrap_err());
        assert!(
            e.contains("no path between \"ap-southeast\" and \"us-east\""),
            "{e}"
        );
    }

    #[test]
    fn bots_scale_in_proportion() {
        let mut s = Scenario::default_scenario();
        s.scale_bots(60).unwrap();
        assert_eq!(s.bots(), 60);
        let counts: Vec<usize> = s.regions.iter().map(|r| r.bots).collect();
        assert_eq!(counts, [24, 21, 15]);
        s.scale_bots(3).unwrap();
        assert_eq!(
            s.regions.iter().map(|r| r.bots).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert!(s.scale_bots(2).is_err());
        assert!(s.scale_bots(MAX_BOTS + 1).is_err());
    }
}
