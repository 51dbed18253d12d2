"""agentmesh for Python: typed asyncio clients of every service and an Agent class.

from agentmesh import Agent, EventBus, Scheduler, Task
"""

from .agent import Agent, AgentStopped, Task, TaskFailure
from .errors import AgentmeshError, FieldViolation
from .eventbus import EventBus
from .scheduler import Scheduler

__all__ = [
    "Agent",
    "AgentStopped",
    "AgentmeshError",
    "EventBus",
    "FieldViolation",
    "Scheduler",
    "Task",
    "TaskFailure",
]
__version__ = "0.1.0"
