//! Destination state machine (work in progress).
