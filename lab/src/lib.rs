//! statecast lab: user-space link emulation and scenarios. Built by the routing issue; this crate holds nothing yet.
