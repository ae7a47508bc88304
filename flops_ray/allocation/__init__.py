"""Query allocation: how a group's budget is split over a batch (allocators, budgets, trace signals, the fit)."""
