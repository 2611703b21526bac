"""Registers the lm-eval tasks (zero-shot suite and lm-eval's WikiText perplexity) in the harness task registry."""
from harness.lmeval import register_tasks
from harness.taskdefs import TASKS, TaskDef

register_tasks(TASKS, TaskDef)
