"""Instructor tooling: reference values, student release, checks and grading (not released to students)."""
