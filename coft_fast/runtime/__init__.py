"""Run-time helpers: atomic file writes, devices and seeding, metrics."""
