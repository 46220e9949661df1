"""Cloud commands: the executor (the one place for command state and recovery) and its handlers."""
