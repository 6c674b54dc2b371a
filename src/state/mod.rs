//! Durable state store (SQLite).
