//! `twinkle worker`: the entry point of one application child process.
