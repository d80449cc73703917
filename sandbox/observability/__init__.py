"""Operations: metrics, structured logs, Redis-sampled gauges, health checks (no Celery here)."""
