"""Side-by-side speed measurements (issue 4). Never imported by the service."""
