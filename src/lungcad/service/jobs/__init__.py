"""The service's job queue: persistent jobs and their workers (``manager``)."""
