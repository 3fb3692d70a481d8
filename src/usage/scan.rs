//! Incremental scanners that find the `usage` object of a response without buffering it.
