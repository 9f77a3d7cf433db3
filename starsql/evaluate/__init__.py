"""Evaluation: Spider -> score -> report (`python -m starsql.evaluate`).

spider: questions, predictions and read-only databases; metrics: execution and exact match;
hardness: Spider's difficulty levels; score: scoring and the report's numbers; report: the
output files; cli: the command line and model mode (generate, then score).
"""
