"""One cog per feature area: `vision` (the model commands), `info` (help, models)."""
