//! Protobuf messages of the Tinker wire protocol (package `tinker_public`, proto3), generated at
//! build time from `proto/tinker_public.proto` (see `build.rs`). That file mirrors the SDK 0.38.0
//! descriptor (`specs/tinker-protocol.md` §7); `optional` fields are proto3 explicit-presence
//! fields and map fields are `BTreeMap`s.

include!(concat!(env!("OUT_DIR"), "/tinker_public.rs"));
