"""Latency, memory and accuracy against the teacher and a field peer."""
