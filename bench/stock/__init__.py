"""The stock design: Flask + Celery ingestion as the seeds describe it, for bench/run.py only."""
