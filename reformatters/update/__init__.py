"""The operational update: append the newest runs and publish region by region (design: Operational update)."""
