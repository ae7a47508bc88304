"""What only the benchmarks and studies use, one concept per module: the studies, the step-time model, timers,
probes of the farm and of in-process replicas, and the batches, tasks and figures the jobs share."""
