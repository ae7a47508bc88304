"""What only the benchmarks use: the estimator study and the farm's step-time model."""
