//! In-process simulation of several shard cores (tests only).
