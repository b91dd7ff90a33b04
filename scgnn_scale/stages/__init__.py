"""One module per pipeline stage; each has ``run(ctx) -> dict`` and reads and writes the run store."""
