"""autobatch: measure the largest micro-batch that fits, then plan SFTTrainer's batch for a target effective batch."""

__version__ = "0.1.0"
