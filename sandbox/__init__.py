"""A secure job sandbox: the domain library (no Celery in here)."""
