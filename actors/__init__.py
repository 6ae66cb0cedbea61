"""Ray actors wrapping `model/` (the streaming agent builds on these)."""
