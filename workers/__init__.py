"""Celery workers: each process serves one replica of one model on pinned devices."""
