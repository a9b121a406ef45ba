"""Async jobs: the durable record of work submitted now and collected later."""
