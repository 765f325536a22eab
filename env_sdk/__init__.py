"""openrft env SDK: protocol v1 models, an env server from an agent function or from tools,
graders and a sandbox to score with, and an async client. See protocol/SPEC.md.

Everything an env author or a client needs is importable from here; the modules behind it
(`env_sdk.server`, `env_sdk.client`, `env_sdk.graders`, `env_sdk.sandbox`, ...) are where it lives.
"""

from env_sdk.agent import Agent, AgentResult, RolloutTask
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
from env_sdk.graders import (
    Grader,
    GraderConfigError,
    GraderError,
    JsonSchemaMatch,
    LLMJudge,
    NumericMatch,
    PythonGrader,
    RegexMatch,
    StringMatch,
    TextSimilarity,
    WeightedGrader,
    extract_json,
    extract_number,
    final_text,
    normalize_text,
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
from env_sdk.sandbox import (
    Isolation,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    available_isolation,
    run_python,
    run_python_async,
)
from env_sdk.server import create_env_app
from env_sdk.tools import ToolError, function_tool_spec, tool_agent

__all__ = [  # noqa: RUF022 - grouped by what they are for, not sorted
    # writing an env: an agent function (or tools + an evaluator) served as a v1 env server
    "Agent",
    "AgentResult",
    "RolloutTask",
    "ToolError",
    "create_env_app",
    "function_tool_spec",
    "tool_agent",
    # the client of an env server
    "EnvClient",
    # graders and evaluators: scoring a model's output (env_sdk.graders)
    "Grader",
    "JsonSchemaMatch",
    "LLMJudge",
    "NumericMatch",
    "PythonGrader",
    "RegexMatch",
    "StringMatch",
    "TextSimilarity",
    "WeightedGrader",
    "extract_json",
    "extract_number",
    "final_text",
    "normalize_text",
    # the sandbox: running untrusted Python under limits (env_sdk.sandbox)
    "Isolation",
    "SandboxLimits",
    "SandboxResult",
    "available_isolation",
    "run_python",
    "run_python_async",
    # the wire models (protocol v1; every one of them in env_sdk.models)
    "PROTOCOL_VERSION",
    "EvaluationResult",
    "Health",
    "InitRequest",
    "InitResponse",
    "Message",
    "RolloutMetadata",
    "Status",
    "StatusCode",
    "StatusResponse",
    "Task",
    "Tool",
    "ToolCall",
    # the client's errors: catch EnvError for all of them (env_sdk.errors draws the tree)
    "EnvError",
    "EnvHTTPError",
    "AuthError",
    "BadRequestError",
    "CapacityError",
    "NotFoundError",
    "ServerError",
    "EnvProtocolError",
    "EnvUnreachableError",
    "WaitTimeoutError",
    # the graders' and the sandbox's errors
    "GraderConfigError",
    "GraderError",
    "SandboxUnavailable",
]
