"""Kubernetes resources from code: each dataset's CronJobs and backfill sizing, rendered and applied by `deploy`."""
