"""The engine over the real DeepSeek-V3 model code (hybrid.load of a tiny random checkpoint, fp32,
torch experts), and `hybrid run` on it: batched requests with chunked prefill give exactly the
tokens of the model's own one-sequence greedy loop; run streams those tokens; failures explain."""

import pytest
import torch
from checkpoints import build
from test_engine_model import VOCAB, write_tiny_tokenizer

import hybrid
from hybrid.cli import main
from hybrid.engine import Engine, SamplingParams


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: the thread pool only adds overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = build(tmp_path_factory.mktemp("ds"), vocab_size=VOCAB, shards=1)
    write_tiny_tokenizer(path)  # the checkpoint ships a Kimi-style tokenizer
    return path


def test_batched_chunked_engine_equals_model_greedy(ckpt):
    model = hybrid.load(ckpt, device="cpu", dtype=torch.float32, experts_backend="torch",
                        progress=False, max_len=96)
    assert model.tokenizer is not None and model.tokenizer.vocab_size == VOCAB
    prompts = [list(range(10 + i, 10 + i + n)) for i, n in enumerate((3, 25, 11, 40))]
    refs = [model.generate(p, 8, temperature=0.0, stop_at_eos=False) for p in prompts]
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    with Engine(model, max_seqs=3, prefill_chunk=16) as eng:  # 4 requests, 3 slots
        assert eng.max_context == 96  # the Model's max_len
        handles = [eng.submit(p, greedy, max_tokens=8) for p in prompts]
        outs = [h.result().token_ids for h in handles]
        # a continuation of request 1 reuses the latent KV its freed slot still holds
        follow = prompts[1] + refs[1] + [5, 6, 7]
        out = eng.generate(follow, greedy, max_tokens=6)
        assert eng.stats()["prompt_tokens_reused"] == len(prompts[1]) + len(refs[1]) - 1
    assert outs == refs
    assert out == model.generate(follow, 6, temperature=0.0, stop_at_eos=False)
    # a cache that cannot fit is refused before anything is allocated
    with pytest.raises(MemoryError, match=r"KV cache for 1000000 sequences x 512 tokens"):
        Engine(model, max_seqs=10**6, max_context=512)




def test_run_prints_the_greedy_continuation(ckpt, capsys):
    model = hybrid.load(ckpt, device="cpu", dtype=torch.float32, experts_backend="torch",
                        progress=False, max_len=64)
    tok = model.tokenizer
    ref = model.generate(tok.encode_prompt("hello"), 6, temperature=0.0, stop_at_eos=False)
    code = main(["run", str(ckpt), "--prompt", "hello", "-n", "6", "--temperature", "0",
                 "--ignore-eos", "--dtype", "float32", "--experts", "torch",
                 "--context-length", "64"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == tok.decode(ref) + "\n"
    assert "6 generated (length)" in err


def test_run_chat_uses_the_template(ckpt, capsys):
    model = hybrid.load(ckpt, device="cpu", dtype=torch.float32, experts_backend="torch",
                        progress=False, max_len=128)
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], thinking=False, tokenize=True)
    ref = model.generate(ids, 4, temperature=0.0, stop_at_eos=False)
    code = main(["run", str(ckpt), "-p", "hi", "-n", "4", "-t", "0", "--chat", "--no-thinking",
                 "--ignore-eos", "--dtype", "float32", "--experts", "torch", "--context-length", "128"])
    out, err = capsys.readouterr()
    assert code == 0 and out == tok.decode(ref) + "\n"
    assert f"{len(ids)} prompt tokens" in err


def test_run_failures_are_explained(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert "cannot load" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--prompt", "x", "-n", "0"]) == 2
    assert main(["run", str(tmp_path), "--prompt", "x", "--system", "s"]) == 2
    assert "--chat" in capsys.readouterr().err


def test_run_prompt_too_long(ckpt, capsys):
    code = main(["run", str(ckpt), "--prompt", "x" * 60, "-n", "10", "--dtype", "float32",
                 "--experts", "torch", "--context-length", "64"])
    assert code == 2
    assert "context limit of 64" in capsys.readouterr().err


def test_run_reads_the_prompt_from_stdin(ckpt, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello"))
    code = main(["run", str(ckpt), "-p", "-", "-n", "3", "-t", "0", "--ignore-eos",
                 "--dtype", "float32", "--experts", "torch", "--context-length", "64"])
    out, err = capsys.readouterr()
    assert code == 0 and "2 prompt tokens, 3 generated (length)" in err  # [BOS] + "hello"
