"""Real tasks available offline: :class:`Task` and the registry (:mod:`.base`); text classification
on MiniLM (:mod:`.text`), digits (:mod:`.digits`) and the tiny T5 task (:mod:`.t5_repeat`)."""
from . import digits, t5_repeat, text
from .base import SPLIT_SEED, TASKS, Task, TaskError, get_task, package_dir, register_task
from .text import minilm_dir

__all__ = ["Task", "TaskError", "TASKS", "get_task", "register_task", "package_dir", "minilm_dir", "SPLIT_SEED"]
