"""The strategy planner: predict memory, traffic and time of a layout, and choose one (docs/planning.md)."""
