//! Source state machine (work in progress).
