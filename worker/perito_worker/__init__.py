"""Perito bulk-job workers: Celery tasks that classify chunks of a job with a warm model."""
