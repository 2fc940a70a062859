"""What the HTTP dialects hand to the backend, and what comes back: dialect-free types.

OpenAI and Anthropic requests are both translated into a Job (messages in the OpenAI/HF chat
shape the chat template reads, or a raw prompt for /v1/completions); the backend streams Pieces
and ends with a Finish. Each dialect then formats those in its own wire shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    messages: list[dict] | None = None  # chat: [{"role", "content", "tool_calls"?, "tool_call_id"?}]
    prompt: str | list[int] | None = None  # completions: text or token ids, no template
    tools: list[dict] | None = None  # OpenAI tool schema [{"type": "function", "function": {...}}]
    thinking: bool | None = None  # None: the chat template's default
    reasoning_budget: int | None = None  # reasoning tokens after which </think> is drawn (Anthropic)
    max_tokens: int | None = None  # None: up to the context length (capped by the server limit)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; n: chosen token + n alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (load tests, benchmarks)
    # Text appended to the rendered prompt as the start of the answer; it is fed to the output
    # parser as if generated. A forced tool choice uses it to open the tool-call section.
    assistant_prefix: str = ""
    prefix_is_output: bool = True  # False: the client wrote the prefix (Anthropic prefill), so
    #                                it is not repeated back in the answer
    parse_tools: bool = False  # tools were offered: parse tool-call sections into calls
    # Images of the messages in prompt order (hybrid.serve.images.ImageRef); each is a
    # {"type": "image"} part of its message's content.
    images: list = field(default_factory=list)
    # Constrained decoding (hybrid.toolcalls.output_grammar): "auto" lets a call name only an
    # offered tool; "required" / "named" (forced_tool) make the answer calls (force_tool_call).
    tool_choice: str = "auto"
    forced_tool: str | None = None
    answer_schema: dict | None = None  # response_format: the answer is JSON valid under this
    answer_lenient: bool = False  # not strict: schema keywords the grammar lacks are ignored
    answer_field: str = "response_format.json_schema.schema"  # where the schema came from (errors)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # best first


@dataclass
class Piece:
    """Newly decoded text; `n_tokens` tokens produced it (text may be empty while a multi-byte
    character is incomplete or a stop string might be starting)."""

    text: str
    n_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finish:
    reason: str  # "stop" (end token), "stop_string", "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    stop_string: str | None = None  # which stop string ended it
    cached_tokens: int = 0  # prompt tokens whose KV the engine reused from the previous turn's slot
