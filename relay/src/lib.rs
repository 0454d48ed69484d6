//! statecast relay: upstream subscription, per-client sessions and fan-out. Built by the fan-out issue; this crate holds nothing yet.
