"""What every stage uses: the transport on Flower's Grid, solver rounds, fits in step, progress
lines, the checkpoint, results.json."""
