"""The process a user runs: CLI, settings, logging."""
