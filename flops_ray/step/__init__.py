"""One training step, independent of where queries run: the forward-only step, its plans and the in-process backend."""
