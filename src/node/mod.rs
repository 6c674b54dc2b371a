//! Node agent: spawns, supervises, restarts and stops this node's application children.
