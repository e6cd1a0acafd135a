//! Cross-crate and interop tests for qmig; see `tests/*.rs`.
