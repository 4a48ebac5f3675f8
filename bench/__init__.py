"""discoverd's benchmark suite: one script per figure, run them all with scripts/bench.sh."""
