"""Evaluating steering: tasks and suites, scorers and metrics, the resumable runner, summaries
at matched fluency and the report."""
