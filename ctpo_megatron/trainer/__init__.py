"""The RL loop (`Trainer`), its step phases, checkpoint glue, metrics sink and timers."""
