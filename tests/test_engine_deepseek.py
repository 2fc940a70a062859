"""The engine over the real DeepSeek-V3 model code (hybrid.load of a tiny random checkpoint, fp32,
torch experts): several requests batched with chunked prefill give exactly the tokens of the
model's own one-sequence greedy loop, and the Model object plugs straight into the Engine."""

import pytest
import torch
from checkpoints import build
from test_engine_model import VOCAB, one_thread, write_tiny_tokenizer  # noqa: F401

import hybrid
from hybrid.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: the thread pool only adds overhead
    try:
        path, _ = build(tmp_path_factory.mktemp("ds"), vocab_size=VOCAB, shards=1)
        write_tiny_tokenizer(path)  # the checkpoint ships a Kimi-style tokenizer
        return hybrid.load(path, device="cpu", dtype=torch.float32, experts_backend="torch",
                           progress=False, max_len=96)
    finally:
        torch.set_num_threads(threads)


def test_batched_chunked_engine_equals_model_greedy(loaded, one_thread):
    model = loaded
    assert model.tokenizer is not None and model.tokenizer.vocab_size == VOCAB
    prompts = [list(range(10 + i, 10 + i + n)) for i, n in enumerate((3, 25, 11, 40))]
    refs = [model.generate(p, 8, temperature=0.0, stop_at_eos=False) for p in prompts]
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    with Engine(model, max_seqs=3, prefill_chunk=16) as eng:  # 4 requests, 3 slots
        assert eng.max_context == 96  # the Model's max_len
        handles = [eng.submit(p, greedy, max_tokens=8) for p in prompts]
        outs = [h.result().token_ids for h in handles]
    assert outs == refs
