"""Side-by-side speed measurements. Never imported by the service."""
