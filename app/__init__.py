"""inferq: a Celery + Redis batch-inference platform with an OpenAI-compatible API.

`app` holds everything that is neither HTTP (`api/`) nor Celery tasks (`workers/`).
It never imports either of them.
"""

__version__ = "0.1.0"
