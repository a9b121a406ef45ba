"""The Celery app Flower loads (`inferq flower`): same broker, key prefix and
serialiser as the workers, and no tasks of its own."""

from __future__ import annotations

from app.celery_app import create_celery
from app.settings import get_settings

celery_app = create_celery(get_settings())
