//! netns harness
