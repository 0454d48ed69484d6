//! statecast origin.
