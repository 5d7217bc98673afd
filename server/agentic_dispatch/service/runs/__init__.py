"""Runs: the run lifecycle (one state machine and its executor), starting and watching containers, timers."""
