"""openrft env SDK: protocol v1 models, an env server from an agent function or from tools,
and an async client. See protocol/SPEC.md."""

from env_sdk.client import EnvClient
from env_sdk.errors import (
    AuthError,
    BadRequestError,
    CapacityError,
    EnvError,
    EnvHTTPError,
    EnvProtocolError,
    EnvUnreachableError,
    NotFoundError,
    ServerError,
    WaitTimeoutError,
)
from env_sdk.models import (
    PROTOCOL_VERSION,
    EvaluationResult,
    Health,
    InitRequest,
    InitResponse,
    Message,
    RolloutMetadata,
    Status,
    StatusCode,
    StatusResponse,
    Task,
    Tool,
    ToolCall,
)
from env_sdk.server import Agent, AgentResult, RolloutTask, create_env_app
from env_sdk.tools import ToolError, function_tool_spec, tool_agent

__all__ = [
    "PROTOCOL_VERSION",
    "Agent",
    "AgentResult",
    "AuthError",
    "BadRequestError",
    "CapacityError",
    "EnvClient",
    "EnvError",
    "EnvHTTPError",
    "EnvProtocolError",
    "EnvUnreachableError",
    "EvaluationResult",
    "Health",
    "InitRequest",
    "InitResponse",
    "Message",
    "NotFoundError",
    "RolloutMetadata",
    "RolloutTask",
    "ServerError",
    "Status",
    "StatusCode",
    "StatusResponse",
    "Task",
    "Tool",
    "ToolCall",
    "ToolError",
    "WaitTimeoutError",
    "create_env_app",
    "function_tool_spec",
    "tool_agent",
]
from env_sdk.graders import Grader, GraderConfigError, GraderError, JsonSchemaMatch, LLMJudge, NumericMatch, PythonGrader, RegexMatch, StringMatch, TextSimilarity, WeightedGrader  # noqa: E402,F401
