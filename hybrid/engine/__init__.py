"""Generation engine: continuous batching, sampling, stop rules and streaming.

    from hybrid.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer, max_seqs=16)          # starts its step thread
    handle = engine.submit(prompt_ids, SamplingParams(temperature=0.7, seed=1),
                           stop=["\\n\\n"], max_tokens=256)
    for ev in handle:                   # or: async for ev in handle.aiter()
        print(ev.text, end="")          # ev.token_ids, ev.logprobs, ev.finish_reason, ev.usage
    engine.stats()                      # running, waiting, generated_tokens, tokens_per_s, ...
    engine.close()

Files: engine.py (scheduler thread), request.py (handles and events), sampling.py (per-row
sampling), stops.py (stop tokens/strings and held-back streaming text), grammar.py (constrained
decoding: SamplingParams(grammar=GrammarCompiler(tokenizer).json_schema(schema))).
"""

from hybrid.engine.engine import Engine
from hybrid.engine.request import (Completion, Event, GenerationError, RequestHandle,
                                   TokenLogprob, Usage)
from hybrid.engine.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestHandle", "Event", "Completion", "Usage",
           "TokenLogprob", "GenerationError"]
