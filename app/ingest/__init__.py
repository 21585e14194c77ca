"""Ingestion: POST /api/logs/<app_id>[/batch] and the event status lookup."""
