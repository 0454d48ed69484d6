//! Shared helpers for statecast benches and load tools.
