//! Head: control plane (node registry, child registration, desired state, status).
