"""Intake: a request becomes a validated, staged, queued workspace; a resume, the next queued run."""
