"""agentmesh for Python: typed asyncio clients of every service and an Agent class.

from agentmesh import Agent, EventBus, Scheduler, Task
"""

from .agent import Agent, AgentStopped, Task, TaskFailure
from .cache import Cache
from .errors import AgentmeshError, FieldViolation
from .eventbus import EventBus
from .health import Health
from .ratelimit import RateLimiter
from .scheduler import Scheduler

__all__ = [
    "Agent",
    "AgentStopped",
    "AgentmeshError",
    "Cache",
    "EventBus",
    "FieldViolation",
    "Health",
    "RateLimiter",
    "Scheduler",
    "Task",
    "TaskFailure",
]
__version__ = "0.1.0"
