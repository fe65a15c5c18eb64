"""Benchmark support: model statistics, timers, statistics, accuracy metrics, reports."""
