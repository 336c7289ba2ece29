"""The bulk-job side: the Redis job store, the Celery queue, where items come from, results
files, and the watchdog that makes every accepted job end."""
