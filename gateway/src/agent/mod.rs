//! Reference agent.
