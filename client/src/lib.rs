//! statecast client library: discovery, probing, sessions and the verified replica. Built by the fan-out and routing issues; this crate holds nothing yet.
